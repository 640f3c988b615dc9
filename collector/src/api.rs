//! JSON shapes of the HTTP API, in the camelCase the proxy's own consumers expect. Pure:
//! built from a snapshot.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    rates::Rates,
    snapshot::{RouteSnapshot, Snapshot, histogram_quantile},
};

/// A rate over the standard windows (1 s, 10 s, 60 s), per second.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateWindows {
    pub instant: f64,
    pub recent: f64,
    pub average: f64,
    /// Per-poll rates, oldest first (only on totals).
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
    pub connections: u64,
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

/// Durations of closed connections, in seconds.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Durations {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
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
    pub active: u64,
    /// Payload bytes of closed connections, from the sockets' own counters.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections_per_second: RateWindows,
    pub throughput: Throughput,
    pub traffic: Traffic,
    pub duration: Durations,
}

/// `/api/v1/proxy`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStats {
    /// When the kernel maps were read, milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub active_connections: u64,
    /// Open connections per route.
    pub connections_by_route: BTreeMap<String, u64>,
    pub total_connections: u64,
    /// New connections per second over the last second (until L7 requests are counted).
    pub requests_per_second: f64,
    pub connection_rates: RateWindows,
    /// Live payload bytes per second, towards (in) and from (out) the proxy.
    pub throughput: Throughput,
    /// Open connections per client address (heaviest clients only).
    #[serde(rename = "connectionsByIP")]
    pub connections_by_ip: BTreeMap<String, u64>,
    /// Clients with the most connections opened since start.
    #[serde(rename = "topIPs")]
    pub top_ips: Vec<TopIp>,
    pub routes: Vec<RouteStats>,
}

fn route_stats(route: &RouteSnapshot) -> RouteStats {
    let totals = &route.totals;
    let count: u64 = totals.durations.iter().sum();
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanosecond sums as float seconds"
    )]
    let mean = (count > 0).then(|| totals.conn.duration_ns as f64 / 1e9 / count as f64);
    RouteStats {
        name: route.route.name.clone(),
        kind: route.route.kind.as_str(),
        ports: route.route.ports.clone(),
        opened: totals.conn.opened,
        closed: totals.conn.closed,
        active: route.active(),
        bytes_in: totals.conn.bytes_in,
        bytes_out: totals.conn.bytes_out,
        connections_per_second: RateWindows::new(route.connection_rates, None),
        throughput: Throughput {
            bytes_in: RateWindows::new(route.bytes_in_rates, None),
            bytes_out: RateWindows::new(route.bytes_out_rates, None),
        },
        traffic: Traffic {
            packets_in: totals.traffic_in.packets,
            packets_out: totals.traffic_out.packets,
            bytes_in: totals.traffic_in.bytes,
            bytes_out: totals.traffic_out.bytes,
            payload_bytes_in: totals.traffic_in.payload_bytes,
            payload_bytes_out: totals.traffic_out.payload_bytes,
        },
        duration: Durations {
            count,
            mean,
            p50: histogram_quantile(&totals.durations, 0.5),
            p90: histogram_quantile(&totals.durations, 0.9),
            p99: histogram_quantile(&totals.durations, 0.99),
        },
    }
}

#[must_use]
pub fn proxy_stats(snapshot: &Snapshot) -> ProxyStats {
    ProxyStats {
        timestamp: snapshot.taken_at_ms,
        active_connections: snapshot.active_connections(),
        connections_by_route: snapshot
            .routes
            .iter()
            .map(|r| (r.route.name.clone(), r.active()))
            .collect(),
        total_connections: snapshot.total_connections(),
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
        connections_by_ip: snapshot
            .clients
            .active
            .iter()
            .map(|(ip, n)| (ip.to_string(), *n))
            .collect(),
        top_ips: snapshot
            .clients
            .top
            .iter()
            .map(|(ip, n)| TopIp {
                ip: ip.to_string(),
                connections: *n,
            })
            .collect(),
        routes: snapshot.routes.iter().map(route_stats).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn proxy_json_has_the_shape_consumers_expect() {
        let mut snapshot = Snapshot::example();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        snapshot.clients.top = vec![(client, 5)];
        snapshot.clients.active = vec![(client, 2)];
        snapshot.connection_rates.instant = 4.5;
        let json = serde_json::to_value(proxy_stats(&snapshot)).unwrap();
        assert_eq!(json["activeConnections"], 2);
        assert_eq!(json["totalConnections"], 5);
        assert_eq!(json["connectionsByRoute"]["web"], 2);
        assert_eq!(json["requestsPerSecond"], 4.5);
        assert_eq!(json["connectionsByIP"]["192.0.2.7"], 2);
        assert_eq!(json["topIPs"][0]["ip"], "192.0.2.7");
        assert_eq!(json["topIPs"][0]["connections"], 5);
        assert!(json["throughput"]["bytesIn"]["history"].is_array());
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
        assert_eq!(web["duration"]["count"], 3);
        assert_eq!(web["duration"]["mean"], 0.5);
        // Two of three closed within [8 µs, 16 µs): the median lies there.
        let p50 = web["duration"]["p50"].as_f64().unwrap();
        assert!((8e-6..16e-6).contains(&p50), "{p50}");
    }
}

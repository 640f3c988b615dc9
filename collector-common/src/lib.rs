//! Types shared by the kernel programs and the agent: one definition of every map
//! key, value and event layout, and the constants (map names, slot counts) both sides use.
//!
//! Every type is `#[repr(C)]` with explicit padding, and a compile-time check pins its
//! size so that the kernel and user views cannot drift apart.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields are named _pad so that nobody mistakes them for data"
)]

use core::mem::size_of;

/// Route slots in the kernel's per-route arrays. A route's slot is stable across restarts.
pub const MAX_ROUTES: u32 = 256;
/// One entry per TCP port in [`ROUTE_BY_PORT`].
pub const PORT_SLOTS: u32 = 65536;
/// Log2 buckets of connection duration in microseconds: bucket `i` holds durations in
/// `[2^i, 2^(i+1))` µs (bucket 0 also holds anything under 1 µs); the last bucket is open-ended.
pub const DURATION_BUCKETS: u32 = 32;
/// Value in [`ROUTE_BY_PORT`] for a port no route watches; otherwise the value is slot + 1.
pub const NO_ROUTE: u32 = 0;

/// Traffic direction index: towards the proxy (destination port is the route's port).
pub const DIR_IN: u32 = 0;
/// Traffic direction index: from the proxy (source port is the route's port).
pub const DIR_OUT: u32 = 1;

/// Map names, as the kernel object declares them and as they are pinned.
pub mod map_names {
    /// `Array<u32>`, [`super::PORT_SLOTS`] entries: local TCP port → route slot + 1.
    pub const ROUTE_BY_PORT: &str = "ROUTE_BY_PORT";
    /// `Array<RouteName>`, [`super::MAX_ROUTES`] entries: which route owns each slot,
    /// so that a restart with a reordered config keeps every route on its own counters.
    pub const ROUTE_NAMES: &str = "ROUTE_NAMES";
    /// `PerCpuArray<ConnCounters>`, one entry per route slot.
    pub const CONN_COUNTERS: &str = "CONN_COUNTERS";
    /// `PerCpuArray<u64>`, `MAX_ROUTES * DURATION_BUCKETS` entries: closed connections by duration.
    pub const CONN_DURATIONS: &str = "CONN_DURATIONS";
    /// `Array<ConnState>`, [`super::CONN_TABLE_SLOTS`] entries: each open tracked connection,
    /// in a slot found from its socket cookie (see [`super::conn_slot`]).
    pub const CONN_STATE: &str = "CONN_STATE";
    /// `RingBuf` of [`super::ConnEvent`].
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
    /// `PerCpuArray<TrafficCounters>`, `MAX_ROUTES * 2` entries indexed by `slot * 2 + dir`.
    pub const ROUTE_TRAFFIC: &str = "ROUTE_TRAFFIC";
    /// `PerCpuArray<u64>`, [`super::ERROR_KINDS`] entries: kernel-side failures by kind.
    pub const ERRORS: &str = "ERRORS";
}

/// Program names, as the kernel object declares them.
pub mod program_names {
    /// `sock_ops` program on the cgroup2 root: connection lifecycle.
    pub const TRACK_CONNECTIONS: &str = "track_connections";
    /// tc ingress classifier: live bytes and packets per route.
    pub const COUNT_INGRESS: &str = "count_ingress";
    /// tc egress classifier: live bytes and packets per route.
    pub const COUNT_EGRESS: &str = "count_egress";
    /// tc ingress classifier for loopback, counting both directions (every packet sent on lo
    /// comes back in through its ingress).
    pub const COUNT_LOOPBACK: &str = "count_loopback";
}

/// Global in the kernel object: the network namespace cookie whose sockets are counted
/// (0 counts every namespace).
pub const GLOBAL_NETNS_COOKIE: &str = "NETNS_COOKIE";

/// Slots of the connection table (a power of two). Tracking allocates and hashes nothing:
/// socket storage allocated per socket (about 2 µs per connection), a hash map cost a
/// jhash, a bucket lock and cache misses per operation. Socket cookies are sequential, so
/// consecutive connections land in neighbouring slots.
pub const CONN_TABLE_SLOTS: u32 = 65536;
/// Slots tried from a cookie's home slot before the table counts as full for it.
pub const CONN_TABLE_PROBES: u32 = 4;

/// Byte size of the connection event ring buffer.
pub const CONN_EVENTS_BYTES: u32 = 1 << 20;

/// Kernel-side failures, counted in [`map_names::ERRORS`] instead of changing a socket's or
/// packet's fate.
pub mod error_kind {
    /// No free slot among the probed ones of the connection table: the connection is
    /// counted as opened, but its close, duration and bytes are lost (`active` stays one
    /// too high).
    pub const CONN_TABLE_FULL: u32 = 0;
    /// The connection event ring buffer was full: the event is lost, counters are not.
    pub const CONN_EVENT_DROPPED: u32 = 1;
    /// A packet on a watched interface was too short to parse its headers.
    pub const PACKET_TRUNCATED: u32 = 2;
}
/// Number of error kinds (entries of [`map_names::ERRORS`]).
pub const ERROR_KINDS: u32 = 3;
/// Names of the error kinds, indexed by kind, as exported in metric labels.
pub const ERROR_KIND_NAMES: [&str; ERROR_KINDS as usize] =
    ["conn_table_full", "conn_event_dropped", "packet_truncated"];

/// Route slot name (UTF-8, NUL-padded), written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteName {
    pub bytes: [u8; 64],
}

/// Connection lifecycle totals for one route (summed over CPUs by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounters {
    /// Connections accepted on the route's ports.
    pub opened: u64,
    /// Tracked connections that reached `TCP_CLOSE`.
    pub closed: u64,
    /// Payload bytes received from clients by closed connections.
    pub bytes_in: u64,
    /// Payload bytes sent to and acknowledged by clients, of closed connections.
    pub bytes_out: u64,
    /// Sum of the durations of closed connections, in nanoseconds.
    pub duration_ns: u64,
}

/// Live traffic for one route and direction, counted per packet by tc.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Packets (a GSO batch counts as one, as nftables counts it).
    pub packets: u64,
    /// Bytes at layer 3 (IP header included).
    pub bytes: u64,
    /// TCP payload bytes.
    pub payload_bytes: u64,
}

/// Flags in [`ConnState::flags`].
pub mod conn_flags {
    /// The peer's FIN was received: `bytes_received` counts it as one byte (set at close).
    pub const FIN_IN: u32 = 1;
    /// Our FIN was acknowledged: `bytes_acked` counts it as one byte.
    pub const FIN_OUT: u32 = 2;
    /// The socket reached `FIN_WAIT2`; `rcv_nxt_fin_wait2` holds `rcv_nxt` at that moment.
    pub const FIN_WAIT2_SEEN: u32 = 4;
}

/// State of a tracked connection, from accept to close: one slot of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Socket cookie of the connection owning the slot; 0 = free. Claimed and released
    /// atomically.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` at `PASSIVE_ESTABLISHED`.
    pub start_ns: u64,
    /// Client address; IPv4 as an IPv4-mapped IPv6 address.
    pub client_addr: [u8; 16],
    /// Route slot.
    pub route: u32,
    /// [`conn_flags`].
    pub flags: u32,
    /// `rcv_nxt` when the socket entered `FIN_WAIT2`, to tell a FIN received later from a close
    /// without one.
    pub rcv_nxt_fin_wait2: u32,
    /// Client port, host byte order.
    pub client_port: u16,
    pub _pad: u16,
}

/// [`ConnEvent::kind`] of a connection that was accepted.
pub const CONN_EVENT_OPEN: u32 = 1;
/// [`ConnEvent::kind`] of a connection that closed.
pub const CONN_EVENT_CLOSE: u32 = 2;

/// A connection open or close, sent to the agent through [`map_names::CONN_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// [`CONN_EVENT_OPEN`] or [`CONN_EVENT_CLOSE`].
    pub kind: u32,
    /// Route slot.
    pub route: u32,
    /// Socket cookie: identifies the connection across its open and close events.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) of the event.
    pub timestamp_ns: u64,
    /// Close only: connection lifetime.
    pub duration_ns: u64,
    /// Close only: payload bytes received from the client.
    pub bytes_in: u64,
    /// Close only: payload bytes sent to and acknowledged by the client.
    pub bytes_out: u64,
    /// Client address; IPv4 as an IPv4-mapped IPv6 address.
    pub client_addr: [u8; 16],
    /// Client port, host byte order.
    pub client_port: u16,
    pub _pad: [u8; 6],
}

// The layouts are part of the kernel/user contract: pin them.
const _: () = assert!(size_of::<RouteName>() == 64);
const _: () = assert!(size_of::<ConnCounters>() == 40);
const _: () = assert!(size_of::<TrafficCounters>() == 24);
const _: () = assert!(size_of::<ConnState>() == 48);
const _: () = assert!(core::mem::offset_of!(ConnState, client_addr) == 16);
const _: () = assert!(core::mem::offset_of!(ConnState, route) == 32);
const _: () = assert!(core::mem::offset_of!(ConnState, client_port) == 44);
const _: () = assert!(CONN_TABLE_SLOTS.is_power_of_two());
const _: () = assert!(size_of::<ConnEvent>() == 72);
const _: () = assert!(core::mem::offset_of!(ConnEvent, client_addr) == 48);
const _: () = assert!(core::mem::offset_of!(ConnEvent, client_port) == 64);

/// Index into [`map_names::CONN_DURATIONS`] for a route slot and bucket.
#[must_use]
pub const fn duration_index(slot: u32, bucket: u32) -> u32 {
    slot * DURATION_BUCKETS + bucket
}

/// Slot of the connection table for `cookie` at `probe` (0..[`CONN_TABLE_PROBES`]).
#[must_use]
pub const fn conn_slot(cookie: u64, probe: u32) -> u32 {
    // Truncation intended: the low bits of a sequential cookie spread consecutive sockets.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "only the low bits pick the slot"
    )]
    let low = cookie as u32;
    low.wrapping_add(probe) & (CONN_TABLE_SLOTS - 1)
}

/// Index into [`map_names::ROUTE_TRAFFIC`] for a route slot and direction.
#[must_use]
pub const fn traffic_index(slot: u32, dir: u32) -> u32 {
    slot * 2 + dir
}

/// Log2 bucket of a duration in nanoseconds (see [`DURATION_BUCKETS`]). Branch-light and
/// loop-free so the verifier sees a constant cost.
#[must_use]
pub const fn duration_bucket(duration_ns: u64) -> u32 {
    let micros = duration_ns / 1000;
    if micros == 0 {
        return 0;
    }
    let log2 = micros.ilog2();
    if log2 >= DURATION_BUCKETS {
        DURATION_BUCKETS - 1
    } else {
        log2
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers and byte arrays, with
    // explicit padding fields and sizes pinned above, so every bit pattern is valid.
    unsafe impl aya::Pod for super::RouteName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_buckets_are_log2_microseconds() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(999), 0);
        assert_eq!(duration_bucket(1_000), 0);
        assert_eq!(duration_bucket(1_999), 0);
        assert_eq!(duration_bucket(2_000), 1);
        assert_eq!(duration_bucket(1_000_000), 9); // 1 ms = 2^9.97 µs
        assert_eq!(duration_bucket(1_000_000_000), 19); // 1 s = 2^19.93 µs
        assert_eq!(duration_bucket(u64::MAX), DURATION_BUCKETS - 1);
    }

    #[test]
    fn connection_slots_wrap_and_probe_forward() {
        assert_eq!(conn_slot(5, 0), 5);
        assert_eq!(conn_slot(5, 3), 8);
        assert_eq!(conn_slot(u64::from(CONN_TABLE_SLOTS) + 7, 0), 7);
        assert_eq!(conn_slot(u64::from(CONN_TABLE_SLOTS) - 1, 1), 0);
    }

    #[test]
    fn indices_do_not_overlap() {
        assert_eq!(duration_index(1, 0), DURATION_BUCKETS);
        assert_eq!(traffic_index(3, DIR_OUT), 7);
    }
}

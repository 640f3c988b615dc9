//! Live traffic per route and direction, counted per packet by the tc classifiers, so that
//! long-lived connections show throughput before they close.
//!
//! Ingress counts packets whose destination port is a route port (towards the proxy), egress
//! those whose source port is (from the proxy). Loopback gets one classifier at ingress that
//! counts both: every packet sent on lo comes back in through its ingress, so one hook sees
//! everything once, at half the runs of two.
//!
//! A port alone does not make a packet the proxy's: a host that forwards (a Kubernetes
//! node's pods reaching out to port 443, pod to pod) sees others' packets on route ports.
//! So on the interfaces the packet must also be to (ingress) or from (egress) an address of
//! this namespace (`LOCAL_ADDRESSES`, kept by the agent), unless `LOCAL_ONLY` is off
//! (`all_namespaces`, where the proxies listen in other namespaces). Loopback carries only
//! this namespace's own packets. The check comes after the port's, so it costs only packets
//! on route ports.
//!
//! At egress, a packet an ifb hands back (egress shaping) crosses the hook a second time:
//! that pass is left ([`handed_back_by_ifb`]).

use aya_ebpf::programs::TcContext;
use collector_common::{
    DIR_IN, DIR_OUT, MAX_ROUTES, NO_ROUTE, TrafficCounters, error_kind, port_bit, traffic_index,
};

use crate::{
    ROUTE_BY_PORT, ROUTE_PORT_BITS, ROUTE_TRAFFIC, count_error,
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN, NEXTHDR_HOP, be16_at,
        ether_type, fixed_header, handed_back_by_ifb, ipv6_upper_layer, is_gso, or_pulled, ours,
        ptr_at, ptr_at_or_pulled, wrong_ip_version,
    },
};

/// The jumbo payload option (RFC 2675).
const IPV6_TLV_JUMBO: u8 = 0xc2;
/// Bytes of the TCP header read: the ports and the data offset.
const TCP_READ: usize = 13;
/// A TCP header without options.
const TCP_HLEN: usize = 20;

/// The parts of a TCP segment that the counters need.
struct Segment {
    src_port: u16,
    dst_port: u16,
    /// Bytes from the IP header on.
    l3_len: u64,
    payload_len: u64,
    ipv6: bool,
}

/// Always inlined: with `dir` constant in each classifier, LLVM cannot turn the port choice
/// into a select between two packet pointers, which the verifier rejects ("bitwise operator
/// on pointer").
#[inline(always)]
pub fn count_packet<const L2: usize>(ctx: &TcContext, dir: u32) {
    let Some(segment) = parse::<L2>(ctx) else {
        return;
    };
    let port = if dir == DIR_IN {
        segment.dst_port
    } else {
        segment.src_port
    };
    if let Some(counters) = route_counters(port, dir)
        && !(dir == DIR_OUT && handed_back_by_ifb(ctx))
        && ours::<L2>(ctx, segment.ipv6, dir == DIR_IN)
    {
        add(counters, &segment);
    }
}

/// Loopback: one packet, counted towards the proxy by destination port and from it by source
/// port.
#[inline(always)]
pub fn count_loopback_packet(ctx: &TcContext) {
    let Some(segment) = parse::<ETH_HLEN>(ctx) else {
        return;
    };
    for (port, dir) in [(segment.dst_port, DIR_IN), (segment.src_port, DIR_OUT)] {
        if let Some(counters) = route_counters(port, dir) {
            add(counters, &segment);
        }
    }
}

/// This CPU's counters of the route on `port`, in direction `dir`, if it is a route port.
#[inline(always)]
fn route_counters(port: u16, dir: u32) -> Option<*mut TrafficCounters> {
    // Most ports seen are no route's (one side of every packet is the client's port): the
    // bitmap answers that without touching the port map.
    let (word, bit) = port_bit(port);
    if ROUTE_PORT_BITS
        .get(word)
        .is_none_or(|&bits| bits & bit == 0)
    {
        return None;
    }
    let &route = ROUTE_BY_PORT.get(u32::from(port))?;
    if route == NO_ROUTE || route > MAX_ROUTES {
        return None;
    }
    ROUTE_TRAFFIC.get_ptr_mut(traffic_index(route - 1, dir))
}

#[inline(always)]
fn add(counters: *mut TrafficCounters, segment: &Segment) {
    // SAFETY: this CPU's slot of our map; BPF programs run with migration disabled.
    let counters = unsafe { &mut *counters };
    counters.packets += 1;
    counters.bytes += segment.l3_len;
    counters.payload_bytes += segment.payload_len;
}

/// A link-layer header of `L2` bytes → IPv4/IPv6 → TCP. `None` for anything else (not
/// ours) and for truncated or self-contradicting headers (counted). Headers outside the
/// linear part are pulled in at the first read that misses them, the IP header's or the TCP
/// header's.
#[inline(always)]
fn parse<const L2: usize>(ctx: &TcContext) -> Option<Segment> {
    let proto = ether_type(ctx);
    let skb_l3_len = u64::from(ctx.len()).saturating_sub(L2 as u64);
    let (l4_offset, ip_len) = match proto {
        ETH_P_IP => {
            let Some(header) = or_pulled::<L2, _>(ctx, TCP_READ, fixed_header::<L2, IPV4_HLEN>)
            else {
                count_error(error_kind::PACKET_TRUNCATED);
                return None;
            };
            if header[9] != IPPROTO_TCP || wrong_ip_version(header[0], 4) {
                return None;
            }
            let ihl = usize::from(header[0] & 0x0f) * 4;
            // A receiving stack drops it (`ip_rcv_core`), as it does a total length under
            // the header length (below: the TCP header cannot fit).
            if ihl < IPV4_HLEN {
                count_error(error_kind::PACKET_MALFORMED);
                return None;
            }
            // Later fragments carry no TCP header: their bytes go uncounted, and say so.
            if be16_at(&header, 6) & 0x1fff != 0 {
                count_error(error_kind::PACKET_UNPARSED);
                return None;
            }
            (L2 + ihl, u64::from(be16_at(&header, 2)))
        }
        ETH_P_IPV6 => {
            let Some(header) = or_pulled::<L2, _>(ctx, TCP_READ, fixed_header::<L2, IPV6_HLEN>)
            else {
                count_error(error_kind::PACKET_TRUNCATED);
                return None;
            };
            if wrong_ip_version(header[0], 6) {
                return None;
            }
            let next_header = header[6];
            let payload = u64::from(be16_at(&header, 4));
            if next_header == IPPROTO_TCP {
                // A payload length of 0 is BIG TCP without the hop-by-hop header (below).
                let ip_len = if payload == 0 {
                    0
                } else {
                    payload + IPV6_HLEN as u64
                };
                (L2 + IPV6_HLEN, ip_len)
            } else if next_header == NEXTHDR_HOP
                && payload == 0
                // SAFETY: ptr_at checked the four bytes.
                && ptr_at::<[u8; 4]>(ctx, L2 + IPV6_HLEN).is_some_and(|hop| unsafe {
                    *hop == [IPPROTO_TCP, 0, IPV6_TLV_JUMBO, 4]
                })
            {
                // A GSO packet over 64 KiB as kernels with IPv6 BIG TCP have built it: a
                // hop-by-hop header holding only the jumbo payload option, then TCP.
                (L2 + IPV6_HLEN + 8, 0)
            } else {
                // Not TCP, or TCP behind extension headers, which are rare on a proxy's
                // connections: not read past, but the walk counts it, and a chain past its
                // reach, as unparsed; nothing else here is ours. (While DNS is counted, only a
                // hop-by-hop header with a zero length comes here: the DNS parser takes the
                // rest, through the same walk. See `may_carry_tcp`.)
                let _ = ipv6_upper_layer::<L2>(ctx, next_header);
                return None;
            }
        }
        _ => return None,
    };
    // A zero length means a GSO packet over 64 KiB (BIG TCP): the skb's length is the
    // packet's (only GSO packets may have one: checked below). A length beyond the skb's is a
    // lie the stack drops the packet for: counted as truncated, not as the bytes it claims.
    let l3_len = if ip_len == 0 { skb_l3_len } else { ip_len };
    if l3_len > skb_l3_len {
        count_error(error_kind::PACKET_TRUNCATED);
        return None;
    }
    // No room for a TCP header in the IP length: malformed whether or not Ethernet padding
    // follows (without, the TCP read below would fail and call it truncated). `black_box`
    // as below: without it the verifier loses the packet pointer.
    if core::hint::black_box(l3_len) < (l4_offset - L2 + TCP_HLEN) as u64 {
        count_error(error_kind::PACKET_MALFORMED);
        return None;
    }
    // Ports and data offset with one bounds check: separate checks let LLVM merge paths in a
    // way the verifier cannot follow (a port register unset on a path it cannot rule out).
    let Some(tcp) = ptr_at_or_pulled::<[u8; TCP_READ]>(ctx, l4_offset, l4_offset + TCP_READ) else {
        count_error(error_kind::PACKET_TRUNCATED);
        return None;
    };
    // SAFETY: ptr_at checked the bytes.
    let tcp = unsafe { &*tcp };
    let src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let tcp_header = u64::from(tcp[12] >> 4) * 4;
    let headers = (l4_offset - L2) as u64 + tcp_header;
    // A receiving stack drops all three (`tcp_v4_rcv`, `tcp_v6_rcv`; the zero length
    // `ip_rcv_core`, `ip6_rcv_core`): counting them would add bytes no connection carries,
    // or payload that is header. Checked after the reads, and the length hidden from LLVM
    // (`black_box`): otherwise it threads the zero length's branch back through the TCP
    // read, and the verifier loses the packet pointer (a regression fails every load).
    if tcp_header < TCP_HLEN as u64
        || headers > l3_len
        || (core::hint::black_box(ip_len) == 0 && !is_gso(ctx))
    {
        count_error(error_kind::PACKET_MALFORMED);
        return None;
    }
    Some(Segment {
        src_port,
        dst_port,
        l3_len,
        payload_len: l3_len - headers,
        ipv6: proto == ETH_P_IPV6,
    })
}

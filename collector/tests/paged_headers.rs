//! Packets whose headers are outside the skb's linear part, as drivers that build received
//! packets from pages leave them with GRO off (`napi_gro_frags`: gve, sfc, mlx4, tun with
//! `IFF_NAPI_FRAGS`): only the Ethernet header is linear. Live traffic and DNS count them
//! exactly; a packet really too short for its headers is still counted truncated, and one
//! whose headers contradict themselves malformed.
#![expect(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{os::fd::AsRawFd as _, time::Duration};

use support::{Agent, AgentConfig, Netns, assert_no_pins, sample, scrape, wait_for};

const TAP: &str = "pgcoll0";
/// The tap, and lo: its classifier runs the same parsers, and is loaded only where watched.
const CONFIG: &str = "interfaces = [\"lo\", \"pgcoll0\"]\n\n[[routes]]\nname = \"web\"\nports = [18080]\ntype = \"http\"\n\n[dns]\nports = [53]\n";
const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0x20, 0x03, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0x20, 0x03, 0x02];
const TAP_ADDR: [u8; 4] = [10, 203, 0, 1];
const PEER_ADDR: [u8; 4] = [10, 203, 0, 2];
const TAP_ADDR6: [u8; 16] = [0xfd, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const PEER_ADDR6: [u8; 16] = [0xfd, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// TCP payloads, sent over IPv4 and IPv6 each.
const PAYLOADS: [usize; 4] = [1, 100, 536, 1400];
/// Names and QTYPEs of the queries, sent over IPv4 and IPv6 each: 3 A (one with a 63-byte
/// label), 2 AAAA, 1 MX.
const QUERIES: [(&str, u16); 6] = [
    ("www.example.", 1),
    ("api.example.", 1),
    (
        "a23456789012345678901234567890123456789012345678901234567890123.example.",
        1,
    ),
    ("www.example.", 28),
    ("v6.example.", 28),
    ("example.", 15),
];

/// Turns GRO off on `interface` of the calling thread's namespace (`ethtool -K gro off`).
fn gro_off(interface: &str) {
    const ETHTOOL_SGRO: u32 = 0x2c;
    // `struct ethtool_value`: the command, then the value.
    let mut value = [ETHTOOL_SGRO, 0];
    // `struct ifreq`: the name, then a pointer to `value`.
    let mut request = [0u8; 40];
    request[..interface.len()].copy_from_slice(interface.as_bytes());
    request[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: SIOCETHTOOL reads a `struct ifreq` whose data points to `value`; both outlive
    // the call, and the socket is closed before return.
    let done = unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let done = libc::ioctl(socket, libc::SIOCETHTOOL, request.as_mut_ptr());
        libc::close(socket);
        done
    };
    assert_eq!(done, 0, "GRO off: {}", std::io::Error::last_os_error());
}

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = bytes.chunks(2).fold(0u32, |sum, pair| {
        sum + u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]))
    });
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// An IP packet from the peer to the tap (IPv6 if `v6`) carrying `l4`, a transport header
/// and its payload, with the checksums filled in (the transport one at `l4_checksum`).
fn ip(v6: bool, protocol: u8, mut l4: Vec<u8>, l4_checksum: usize) -> Vec<u8> {
    let len = u16::try_from(l4.len()).unwrap();
    let addresses = if v6 {
        [PEER_ADDR6, TAP_ADDR6].concat()
    } else {
        [PEER_ADDR, TAP_ADDR].concat()
    };
    // IPv6's pseudo-header holds the same 16-bit words as IPv4's, in another order.
    let mut pseudo = addresses.clone();
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let sum = checksum(&pseudo);
    l4[l4_checksum..l4_checksum + 2].copy_from_slice(&sum.to_be_bytes());
    let mut packet = if v6 {
        let mut header = vec![0x60, 0, 0, 0];
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&[protocol, 64]);
        header
    } else {
        let mut header = vec![0x45, 0];
        header.extend_from_slice(&(20 + len).to_be_bytes());
        header.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
        header
    };
    packet.extend_from_slice(&addresses);
    if !v6 {
        let sum = checksum(&packet);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    packet.extend_from_slice(&l4);
    packet
}

/// A TCP segment (ACK) to port 18080 with `payload` bytes, in its IP packet.
fn tcp(v6: bool, payload: usize) -> Vec<u8> {
    let mut segment = 40000u16.to_be_bytes().to_vec();
    segment.extend_from_slice(&18080u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    segment.extend(std::iter::repeat_n(b'p', payload));
    ip(v6, IPPROTO_TCP, segment, 16)
}

/// A DNS query (recursion desired) for `name` of `qtype` to port 53, in its IP packet.
fn dns_query(v6: bool, id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split_terminator('.') {
        message.push(u8::try_from(label.len()).unwrap());
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&1u16.to_be_bytes());
    let mut datagram = (40000 + id).to_be_bytes().to_vec();
    datagram.extend_from_slice(&53u16.to_be_bytes());
    datagram.extend_from_slice(&u16::try_from(8 + message.len()).unwrap().to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(&message);
    ip(v6, IPPROTO_UDP, datagram, 6)
}

/// `packet` (IPv6, its transport `protocol`) with two extension headers before its
/// transport header: hop-by-hop of `hop_by_hop_units` 8-byte units, then destination
/// options of one, each holding only padding.
fn behind_extension_headers(mut packet: Vec<u8>, protocol: u8, hop_by_hop_units: u8) -> Vec<u8> {
    const NEXTHDR_DEST: u8 = 60;
    let hop_by_hop = usize::from(hop_by_hop_units) * 8;
    let added = u16::try_from(hop_by_hop + 8).unwrap();
    let payload = u16::from_be_bytes([packet[4], packet[5]]) + added;
    packet[4..6].copy_from_slice(&payload.to_be_bytes());
    packet[6] = 0;
    // Each header: next header, length in 8-byte units after the first, one PadN option.
    let mut headers = vec![
        NEXTHDR_DEST,
        hop_by_hop_units - 1,
        1,
        u8::try_from(hop_by_hop - 4).unwrap(),
    ];
    headers.resize(hop_by_hop, 0);
    headers.extend_from_slice(&[protocol, 0, 1, 4, 0, 0, 0, 0]);
    packet.splice(40..40, headers);
    packet
}

/// Writes `packet` to the tap as an Ethernet frame, in two pieces: tun puts the first, the
/// Ethernet header and the packet's first `linear` bytes, in the linear part, and the rest
/// in pages.
fn receive(tap: &std::fs::File, packet: &[u8], linear: usize) {
    let mut header = TAP_MAC.to_vec();
    header.extend_from_slice(&PEER_MAC);
    header.extend_from_slice(if packet[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    header.extend_from_slice(&packet[..linear]);
    let packet = &packet[linear..];
    let pieces = [
        libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: packet.as_ptr().cast_mut().cast(),
            iov_len: packet.len(),
        },
    ];
    // SAFETY: two iovecs over buffers that outlive the call, which only reads them.
    let written = unsafe { libc::writev(tap.as_raw_fd(), pieces.as_ptr(), 2) };
    assert_eq!(
        usize::try_from(written).ok(),
        Some(header.len() + packet.len()),
        "{}",
        std::io::Error::last_os_error()
    );
}

/// What the agent has seen of the frames: packets counted on the route, queries, and
/// packets counted truncated.
fn seen(metrics: &str) -> f64 {
    let count = |name, labels: &[(&str, &str)]| sample(metrics, name, labels).unwrap_or(0.0);
    count(
        "collector_proxy_packets_total",
        &[("route", "web"), ("direction", "in")],
    ) + ["A", "AAAA", "MX"]
        .iter()
        .map(|&qtype| count("collector_dns_queries_total", &[("qtype", qtype)]))
        .sum::<f64>()
        + truncated(metrics)
}

/// Packets counted as too short for their headers.
fn truncated(metrics: &str) -> f64 {
    kernel_errors(metrics, "packet_truncated")
}

/// Packets counted as headers that contradict themselves.
fn malformed(metrics: &str) -> f64 {
    kernel_errors(metrics, "packet_malformed")
}

fn kernel_errors(metrics: &str, kind: &str) -> f64 {
    sample(metrics, "collector_bpf_errors_total", &[("kind", kind)]).unwrap_or(0.0)
}

/// The tap in `netns` that builds received packets from pages, GRO off, addressed and up.
fn paged_tap(netns: &Netns) -> std::fs::File {
    let tap = support::open_tun_with(
        netns,
        TAP,
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_NAPI | libc::IFF_NAPI_FRAGS,
    );
    support::ip_batch(
        &netns.name,
        &format!(
            "link set {TAP} address 02:00:00:20:03:01\n\
             addr add 10.203.0.1/24 dev {TAP}\n\
             addr add fd00:203::1/64 dev {TAP} nodad\n\
             neigh add 10.203.0.2 lladdr 02:00:00:20:03:02 dev {TAP}\n\
             neigh add fd00:203::2 lladdr 02:00:00:20:03:02 dev {TAP}\n\
             link set {TAP} up\n"
        ),
    );
    netns.run(|| gro_off(TAP));
    tap
}

/// Until 2026-12-04 such packets were counted as `packet_truncated` and their bytes and
/// queries lost.
#[test]
fn headers_outside_the_linear_part_are_pulled_in_and_counted_exactly() {
    let netns = Netns::new();
    let tap = paged_tap(&netns);
    let config = AgentConfig::new(CONFIG);
    let agent = Agent::start(&netns, &config);

    // The IP header in pages too, or in part (the linear part ending before IPv4's protocol,
    // or before IPv6's addresses), or linear with only the TCP or UDP header in pages.
    for v6 in [false, true] {
        for linear in [0, if v6 { 8 } else { 4 }, if v6 { 40 } else { 20 }] {
            for payload in PAYLOADS {
                receive(&tap, &tcp(v6, payload), linear);
            }
            for (id, (name, qtype)) in (1..).zip(QUERIES) {
                receive(&tap, &dns_query(v6, id, name, qtype), linear);
            }
        }
        // The DNS header and the name's first bytes linear, the rest in pages: the copy
        // straight from the packet stops inside the message (above, after the UDP header),
        // and the helper copies the message again whole (its QTYPE lies in pages).
        let into_the_name = if v6 { 40 } else { 20 } + 8 + 12 + 5;
        for (id, (name, qtype)) in (1..).zip(QUERIES) {
            receive(&tap, &dns_query(v6, id, name, qtype), into_the_name);
        }
    }
    let frames = (6 * PAYLOADS.len() + 8 * QUERIES.len()) as f64;
    let sent = 6 * PAYLOADS.iter().sum::<usize>();
    let metrics = wait_for("every frame to be seen", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (seen(&metrics) >= frames).then_some(metrics)
    });
    let payload = |metrics: &str| {
        sample(
            metrics,
            "collector_proxy_traffic_payload_bytes_total",
            &[("route", "web"), ("direction", "in")],
        )
    };
    assert_eq!(
        payload(&metrics),
        Some(sent as f64),
        "live payload bytes in; {} packets counted truncated",
        truncated(&metrics)
    );
    for (qtype, count) in [("A", 24.0), ("AAAA", 16.0), ("MX", 8.0)] {
        assert_eq!(
            sample(&metrics, "collector_dns_queries_total", &[("qtype", qtype)]),
            Some(count),
            "{qtype} queries"
        );
    }
    assert_eq!(truncated(&metrics), 0.0);

    // A packet that ends inside its TCP header, its IP header saying 40 bytes, is pulled in
    // as far as it goes, and truncated.
    let mut short = tcp(false, 0);
    short.truncate(20 + 6);
    receive(&tap, &short, 0);
    let metrics = wait_for("the short packet", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (truncated(&metrics) >= 1.0).then_some(metrics)
    });
    assert_eq!(truncated(&metrics), 1.0);
    assert_eq!(payload(&metrics), Some(sent as f64));

    // Headers that contradict themselves, pulled in and counted malformed, not as traffic:
    // a TCP data offset of 4 words (the stack drops it), and an IPv6 payload length of 0,
    // which only a GSO packet over 64 KiB may have (GRO is off: none is).
    assert_eq!(malformed(&metrics), 0.0);
    let mut short_offset = tcp(false, 100);
    short_offset[20 + 12] = 0x40;
    let mut zero_length = tcp(true, 100);
    zero_length[4..6].fill(0);
    for packet in [short_offset, zero_length] {
        receive(&tap, &packet, 0);
    }
    let metrics = wait_for("the malformed packets", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (malformed(&metrics) >= 2.0).then_some(metrics)
    });
    assert_eq!(malformed(&metrics), 2.0);
    assert_eq!(truncated(&metrics), 1.0);
    assert_eq!(payload(&metrics), Some(sent as f64));

    extension_headers_in_pages_are_walked(&netns, &tap);
    let metrics = scrape(&netns);
    assert_eq!(malformed(&metrics), 2.0);
    assert_eq!(truncated(&metrics), 1.0);
    assert_eq!(payload(&metrics), Some(sent as f64));
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

/// Extension headers in pages, past what the first pull brings in: walked all the same. A
/// query behind them is counted; a TCP segment behind them, which live traffic does not
/// read past, counts as unparsed (both went silently before 2026-12-04). The A queries sent
/// before are counted already.
fn extension_headers_in_pages_are_walked(netns: &Netns, tap: &std::fs::File) {
    let a_queries = |metrics: &str| {
        sample(metrics, "collector_dns_queries_total", &[("qtype", "A")]).unwrap_or(0.0)
    };
    let before = a_queries(&scrape(netns));
    let query = behind_extension_headers(dns_query(true, 99, "www.example.", 1), IPPROTO_UDP, 1);
    let segment = behind_extension_headers(tcp(true, 100), IPPROTO_TCP, 1);
    receive(tap, &query, 0);
    receive(tap, &segment, 0);
    let metrics = wait_for(
        "the packets behind extension headers",
        Duration::from_secs(10),
        || {
            let metrics = scrape(netns);
            (a_queries(&metrics) > before && kernel_errors(&metrics, "packet_unparsed") >= 1.0)
                .then_some(metrics)
        },
    );
    assert_eq!(a_queries(&metrics), before + 1.0);
    assert_eq!(kernel_errors(&metrics, "packet_unparsed"), 1.0);
}

/// With DNS off the TCP counting walks IPv6 extension headers itself (with DNS on, the DNS
/// parser does): a segment behind them counts as unparsed, and one without as traffic. The
/// hop-by-hop header is 16 bytes long, so the second header lies past what the first pull
/// brings in (the IPv6 header and 13 bytes), and is read from the pages.
#[test]
fn with_dns_off_a_segment_behind_extension_headers_in_pages_counts_as_unparsed() {
    let netns = Netns::new();
    let tap = paged_tap(&netns);
    let config = AgentConfig::new(&CONFIG.replace("[dns]\n", "[dns]\nenabled = false\n"));
    let agent = Agent::start(&netns, &config);
    receive(
        &tap,
        &behind_extension_headers(tcp(true, 100), IPPROTO_TCP, 2),
        0,
    );
    receive(&tap, &tcp(true, 100), 0);
    let metrics = wait_for("both segments", Duration::from_secs(10), || {
        let metrics = scrape(&netns);
        (kernel_errors(&metrics, "packet_unparsed") >= 1.0
            && sample(
                &metrics,
                "collector_proxy_traffic_payload_bytes_total",
                &[("route", "web"), ("direction", "in")],
            ) == Some(100.0))
        .then_some(metrics)
    });
    assert_eq!(kernel_errors(&metrics, "packet_unparsed"), 1.0);
    assert_eq!(truncated(&metrics), 0.0);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
}

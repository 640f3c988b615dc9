//! The live traffic counting of the classifiers on crafted TCP packets, run in the kernel
//! through `BPF_PROG_TEST_RUN`: the bytes counted are those the packet carries, never what
//! a header claims beyond them, GSO packets over 64 KiB (BIG TCP) count whole, headers that
//! contradict themselves count as malformed, not as traffic, and packets whose ports cannot
//! be read (fragments, extension headers) count as unparsed.

mod support;

use aya::{
    EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use collector_common::{
    DIR_IN, DIR_OUT, GLOBAL_DNS_ENABLED, GLOBAL_LOCAL_ONLY, LOCAL_ADDRESS_SLOTS,
    LOCAL_ADDRESS_WAYS, TrafficCounters, address_words, error_kind, local_address_set_bits,
    local_address_sets, map_names, port_bit, program_names, tally_table_len, traffic_index,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

const ROUTE_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40000;
const TCP_HLEN: usize = 20;
/// `TC_ACT_UNSPEC` as the kernel returns it: the packet continues unchanged.
const PASS: u32 = u32::MAX;

struct Ingress {
    ebpf: aya::Ebpf,
    /// The classifier run: the interfaces' ingress one, loopback's, which counts a packet to
    /// the route port as inbound too, or the interfaces' egress one ([`Self::on_egress`]).
    program: &'static str,
    /// The direction whose counters are read.
    dir: u32,
}

/// What one packet added: to the route's counters, and to the truncated, malformed and
/// unparsed packets.
#[derive(Debug, PartialEq, Eq)]
struct Counted {
    packets: u64,
    bytes: u64,
    payload_bytes: u64,
    truncated: u64,
    malformed: u64,
    unparsed: u64,
}

/// Offsets in `struct __sk_buff` (`linux/bpf.h`) of the two GSO fields a test run takes
/// from its context, and the struct's size.
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;
const SKB_SIZE: usize = 192;

impl Ingress {
    /// The kernel object on its own, with [`ROUTE_PORT`] as route slot 0.
    fn load() -> Self {
        Self::load_with(0, 1)
    }

    /// [`Self::load`], counting only packets to or from `LOCAL_ADDRESSES` if `local_only`
    /// is 1, as the agent loads it without `all_namespaces`, and DNS if `dns_enabled` is 1.
    fn load_with(local_only: u32, dns_enabled: u32) -> Self {
        support::require_root();
        let table_len = tally_table_len(aya::util::nr_cpus().unwrap()).unwrap();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::DNS_NAMES, table_len)
            .map_max_entries(map_names::CONN_CLIENTS, table_len)
            .override_global(GLOBAL_LOCAL_ONLY, &local_only, true)
            .override_global(GLOBAL_DNS_ENABLED, &dns_enabled, true)
            .load(OBJECT)
            .unwrap();
        support::load_classifiers(
            &mut ebpf,
            &[
                program_names::COUNT_INGRESS,
                program_names::COUNT_LOOPBACK,
                program_names::COUNT_EGRESS,
            ],
        );
        let mut ingress = Self {
            ebpf,
            program: program_names::COUNT_INGRESS,
            dir: DIR_IN,
        };
        ingress.add_route_port(ROUTE_PORT);
        ingress
    }

    fn add_route_port(&mut self, port: u16) {
        let mut ports: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::ROUTE_BY_PORT).unwrap()).unwrap();
        ports.set(u32::from(port), 1, 0).unwrap();
        let (word, bit) = port_bit(port);
        let mut bits: Array<_, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::ROUTE_PORT_BITS).unwrap()).unwrap();
        let bits_before = bits.get(&word, 0).unwrap();
        bits.set(word, bits_before | bit, 0).unwrap();
    }

    /// Runs loopback's classifier from now on.
    fn on_loopback(self) -> Self {
        Self {
            program: program_names::COUNT_LOOPBACK,
            ..self
        }
    }

    /// Runs the interfaces' egress classifier from now on, which counts by source port: the
    /// frames' client port is made a port of the same route, and its outbound counters read.
    fn on_egress(mut self) -> Self {
        self.add_route_port(CLIENT_PORT);
        Self {
            program: program_names::COUNT_EGRESS,
            dir: DIR_OUT,
            ..self
        }
    }

    fn set_address(&mut self, slot: u32, address: [u64; 2]) {
        let mut table: Array<_, [u64; 2]> =
            Array::try_from(self.ebpf.map_mut(map_names::LOCAL_ADDRESSES).unwrap()).unwrap();
        table.set(slot, address, 0).unwrap();
    }

    fn set_table_complete(&mut self, complete: u32) {
        let mut flag: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut(map_names::LOCAL_ADDRESSES_COMPLETE)
                .unwrap(),
        )
        .unwrap();
        flag.set(0, complete, 0).unwrap();
    }

    fn totals(&self) -> Counted {
        let traffic: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(map_names::ROUTE_TRAFFIC).unwrap()).unwrap();
        let errors: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::ERRORS).unwrap()).unwrap();
        let error = |kind| errors.get(&kind, 0).unwrap().iter().sum();
        let per_cpu = traffic.get(&traffic_index(0, self.dir), 0).unwrap();
        Counted {
            packets: per_cpu.iter().map(|c| c.packets).sum(),
            bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            payload_bytes: per_cpu.iter().map(|c| c.payload_bytes).sum(),
            truncated: error(error_kind::PACKET_TRUNCATED),
            malformed: error(error_kind::PACKET_MALFORMED),
            unparsed: error(error_kind::PACKET_UNPARSED),
        }
    }

    /// Runs the ingress classifier on `frame`; what it counted.
    fn run(&self, frame: &[u8]) -> Counted {
        self.run_as_gso(frame, 0)
    }

    /// [`Self::run`] on a GSO packet of `gso_size`-byte segments (0: not GSO), as GRO
    /// builds at ingress.
    fn run_as_gso(&self, frame: &[u8], gso_size: u32) -> Counted {
        let before = self.totals();
        let program: &SchedClassifier =
            self.ebpf.program(self.program).unwrap().try_into().unwrap();
        let mut skb = [0u8; SKB_SIZE];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        if gso_size != 0 {
            let segments = u32::try_from(frame.len()).unwrap().div_ceil(gso_size);
            skb[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&segments.to_ne_bytes());
            skb[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
            opts.ctx_in = Some(&skb);
        }
        let result = program.test_run(opts).unwrap();
        assert_eq!(result.return_value, PASS, "the classifier changed a fate");
        let after = self.totals();
        Counted {
            packets: after.packets - before.packets,
            bytes: after.bytes - before.bytes,
            payload_bytes: after.payload_bytes - before.payload_bytes,
            truncated: after.truncated - before.truncated,
            malformed: after.malformed - before.malformed,
            unparsed: after.unparsed - before.unparsed,
        }
    }
}

/// A TCP header from the client to the route port, with no options.
fn tcp_header() -> Vec<u8> {
    let mut tcp = vec![0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&ROUTE_PORT.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: five 32-bit words, TCP_HLEN
    tcp[13] = 0x18; // PSH, ACK
    tcp
}

/// An Ethernet frame of IPv4 whose header says `total_len`, carrying TCP and `payload`
/// bytes, then `padding` bytes of Ethernet padding.
fn ipv4(total_len: u16, payload: usize, padding: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    frame.extend(ip);
    frame.extend(tcp_header());
    frame.extend(std::iter::repeat_n(b'x', payload + padding));
    frame
}

/// An Ethernet frame of IPv6 whose header says `payload_len`, with `extension` (bytes
/// between the IPv6 header and TCP; a hop-by-hop header if any) and TCP carrying `payload`
/// bytes.
fn ipv6(payload_len: u16, extension: &[u8], payload: usize) -> Vec<u8> {
    let next = if extension.is_empty() { 6 } else { 0 };
    ipv6_after(next, payload_len, extension, payload)
}

/// [`ipv6`] with the fixed header's next header `next`.
fn ipv6_after(next: u8, payload_len: u16, extension: &[u8], payload: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next;
    ip[7] = 64;
    ip[23] = 2;
    ip[39] = 1;
    frame.extend(ip);
    frame.extend_from_slice(extension);
    frame.extend(tcp_header());
    frame.extend(std::iter::repeat_n(b'x', payload));
    frame
}

fn counted(bytes: u64, payload_bytes: u64) -> Counted {
    Counted {
        packets: 1,
        bytes,
        payload_bytes,
        ..NOTHING
    }
}

const NOTHING: Counted = Counted {
    packets: 0,
    bytes: 0,
    payload_bytes: 0,
    truncated: 0,
    malformed: 0,
    unparsed: 0,
};

const TRUNCATED: Counted = Counted {
    truncated: 1,
    ..NOTHING
};

const MALFORMED: Counted = Counted {
    malformed: 1,
    ..NOTHING
};

const UNPARSED: Counted = Counted {
    unparsed: 1,
    ..NOTHING
};

#[test]
fn bytes_are_those_the_packet_carries() {
    let ingress = Ingress::load();
    // As sent: 20 + 20 + 100.
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
    // A bare ACK padded to Ethernet's minimum: the padding is no packet's.
    assert_eq!(ingress.run(&ipv4(40, 0, 6)), counted(40, 0));
    // A header claiming 64 KiB on a packet of 140 bytes: the stack drops it; counted as
    // truncated, not as 65,535 bytes.
    assert_eq!(ingress.run(&ipv4(65_535, 100, 0)), TRUNCATED);
    assert_eq!(ingress.run(&ipv4(141, 100, 0)), TRUNCATED);
    assert_eq!(ingress.run(&ipv6(u16::MAX, &[], 100)), TRUNCATED);
    assert_eq!(ingress.run(&ipv6(121, &[], 100)), TRUNCATED);
    assert_eq!(ingress.run(&ipv6(120, &[], 100)), counted(160, 100));
}

#[test]
fn gso_packets_over_64_kib_count_whole() {
    let ingress = Ingress::load();
    // A test run cannot build a packet over 64 KiB; what marks one is its zero length on a
    // GSO packet, here of 500-byte segments.
    // IPv4 BIG TCP: a total length of 0.
    assert_eq!(
        ingress.run_as_gso(&ipv4(0, 1000, 0), 500),
        counted(1040, 1000)
    );
    // IPv6 BIG TCP without a hop-by-hop header: a payload length of 0.
    assert_eq!(
        ingress.run_as_gso(&ipv6(0, &[], 1000), 500),
        counted(1060, 1000)
    );
    // IPv6 BIG TCP as it has been built with one, holding only the jumbo payload option.
    let jumbo = [6, 0, 0xc2, 4, 0, 1, 0, 0];
    assert_eq!(
        ingress.run_as_gso(&ipv6(0, &jumbo, 1000), 500),
        counted(1068, 1000)
    );
    // Any other hop-by-hop header before TCP is not read past: unparsed.
    let other = [6, 0, 1, 4, 0, 0, 0, 0];
    assert_eq!(ingress.run(&ipv6(28 + 1000, &other, 1000)), UNPARSED);
    // Also with a zero length, which sends it to the TCP counting rather than DNS's walk.
    assert_eq!(ingress.run_as_gso(&ipv6(0, &other, 1000), 500), UNPARSED);
    // The same zero lengths on packets that are not GSO packets: the stack drops them.
    assert_eq!(ingress.run(&ipv4(0, 1000, 0)), MALFORMED);
    assert_eq!(ingress.run(&ipv6(0, &[], 1000)), MALFORMED);
    assert_eq!(ingress.run(&ipv6(0, &jumbo, 1000)), MALFORMED);
    // A GSO packet with its length set is counted at that length, as any other.
    assert_eq!(
        ingress.run_as_gso(&ipv4(1040, 1000, 0), 500),
        counted(1040, 1000)
    );
}

/// Headers that contradict themselves are dropped by the stack (`ip_rcv_core`,
/// `tcp_v4_rcv`, `tcp_v6_rcv`) and were counted as traffic: a data offset under 5 words
/// made header bytes payload, one past the IP length counted a packet no connection took.
/// The Ethernet classifiers, each with its own copy of the parser, and ingress's built
/// without DNS. (Those of interfaces without a link-layer header cannot be run on a test
/// run's frames, which start with an Ethernet header; `tests/interfaces.rs` counts live
/// traffic through them.)
#[test]
fn self_contradicting_headers_count_as_malformed_not_as_traffic() {
    for ingress in every_classifier() {
        self_contradicting_headers_on(&ingress);
    }
}

/// The interfaces' ingress and egress classifiers and loopback's, and ingress's without DNS
/// (the TCP parser then sees every packet).
fn every_classifier() -> [Ingress; 4] {
    [
        Ingress::load(),
        Ingress::load().on_loopback(),
        Ingress::load().on_egress(),
        Ingress::load_with(0, 0),
    ]
}

fn self_contradicting_headers_on(ingress: &Ingress) {
    let with = |mut frame: Vec<u8>, offset: usize, byte: u8| {
        frame[offset] = byte;
        frame
    };
    let ip4 = 14;
    let tcp4 = ip4 + 20;
    let tcp6 = 14 + 40;
    // The well-formed packet first, so that the cases below differ from it by their one
    // byte alone.
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
    // IPv4 header lengths under 20 bytes, and 0.
    assert_eq!(ingress.run(&with(ipv4(140, 100, 0), ip4, 0x44)), MALFORMED);
    assert_eq!(ingress.run(&with(ipv4(140, 100, 0), ip4, 0x40)), MALFORMED);
    // A version that is not the EtherType's (`ip_rcv_core` and `ipv6_rcv` drop it).
    assert_eq!(ingress.run(&with(ipv4(140, 100, 0), ip4, 0x65)), MALFORMED);
    assert_eq!(ingress.run(&ipv6(120, &[], 100)), counted(160, 100));
    assert_eq!(
        ingress.run(&with(ipv6(120, &[], 100), ip4, 0x40)),
        MALFORMED
    );
    // IPv6's whatever it carries (ICMPv6 here), with DNS counted or not.
    assert_eq!(
        ingress.run(&with(ipv6_after(58, 120, &[], 100), ip4, 0x40)),
        MALFORMED
    );
    // A total length shorter than the IPv4 header.
    assert_eq!(ingress.run(&ipv4(19, 100, 0)), MALFORMED);
    // One with no room for a TCP header (26 bytes: 6 of TCP), whether the frame ends there
    // or Ethernet padding follows: malformed both ways, not truncated where it ends.
    let mut unpadded = ipv4(26, 0, 0);
    unpadded.truncate(14 + 26);
    assert_eq!(ingress.run(&unpadded), MALFORMED);
    assert_eq!(ingress.run(&ipv4(26, 0, 0)), MALFORMED);
    // Both wrong, the length past the frame as well: truncated, as the stack checks that
    // first.
    assert_eq!(
        ingress.run(&with(ipv4(200, 100, 0), tcp4 + 12, 4 << 4)),
        TRUNCATED
    );
    // TCP data offsets under 5 words.
    for words in [0u8, 4] {
        assert_eq!(
            ingress.run(&with(ipv4(140, 100, 0), tcp4 + 12, words << 4)),
            MALFORMED
        );
        assert_eq!(
            ingress.run(&with(ipv6(120, &[], 100), tcp6 + 12, words << 4)),
            MALFORMED
        );
    }
    // A TCP header longer than the IP length leaves room for: 60 bytes of TCP header in a
    // 40-byte IPv4 packet padded to 80 bytes of frame.
    assert_eq!(
        ingress.run(&with(ipv4(40, 0, 26), tcp4 + 12, 15 << 4)),
        MALFORMED
    );
    assert_eq!(
        ingress.run(&with(ipv6(20, &[], 0), tcp6 + 12, 6 << 4)),
        MALFORMED
    );
    // Options the IP length holds: counted, the options not as payload.
    assert_eq!(
        ingress.run(&with(ipv4(140, 100, 0), tcp4 + 12, 15 << 4)),
        counted(140, 60)
    );
    assert_eq!(
        ingress.run(&with(ipv6(120, &[], 100), tcp6 + 12, 6 << 4)),
        counted(160, 96)
    );
    // An IPv4 header with options (24 bytes) is read past them.
    let mut options = ipv4(144, 100, 0);
    options[ip4] = 0x46;
    options.splice(tcp4..tcp4, [1, 1, 1, 1]);
    options.truncate(14 + 144);
    assert_eq!(ingress.run(&options), counted(144, 100));
}

/// The address look-up finds an address in any way of either of its two sets (the agent
/// puts it wherever it makes room), and nothing else; while the table is marked
/// incomplete the port alone decides.
#[test]
fn the_address_table_is_searched_in_both_sets_and_every_way() {
    let mut ingress = Ingress::load_with(1, 1);
    // The frames' destination, 10.0.0.1, IPv4 mapped into IPv6 as the table keys it.
    let ours = address_words(
        &std::net::Ipv4Addr::new(10, 0, 0, 1)
            .to_ipv6_mapped()
            .octets(),
    );
    let [first, second] = local_address_sets(ours, local_address_set_bits(LOCAL_ADDRESS_SLOTS));
    assert_ne!(first, second, "the test needs an address with two sets");
    // Every other way of both sets holds another address; ours is in the last way of the
    // second set.
    for way in 0..LOCAL_ADDRESS_WAYS {
        ingress.set_address(first + way, [u64::from(way) + 1, 7]);
        ingress.set_address(second + way, [u64::from(way) + 11, 7]);
    }
    ingress.set_address(second + LOCAL_ADDRESS_WAYS - 1, ours);
    ingress.set_table_complete(1);
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
    // Moved to the last way of its first set.
    ingress.set_address(first + LOCAL_ADDRESS_WAYS - 1, ours);
    ingress.set_address(second + LOCAL_ADDRESS_WAYS - 1, [0, 0]);
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
    // Gone from the table: another host's packet now.
    ingress.set_address(first + LOCAL_ADDRESS_WAYS - 1, [0, 0]);
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), NOTHING);
    // `::`, what the free slots hold, is no one's.
    let mut unspecified = ipv6(120, &[], 100);
    unspecified[14 + 39] = 0;
    assert_eq!(ingress.run(&unspecified), NOTHING);
    // Incomplete: by port alone.
    ingress.set_table_complete(0);
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
}

/// Packets whose ports the classifiers cannot read were left without a word: their bytes
/// missing from the live counters with nothing saying so. Now each TCP one counts as
/// unparsed, and nothing else does.
#[test]
fn fragments_and_extension_headers_before_tcp_count_as_unparsed() {
    for ingress in every_classifier() {
        unparsed_on(&ingress);
    }
}

fn unparsed_on(ingress: &Ingress) {
    let ip4 = 14;
    let with_fragment = |flags_offset: u16| {
        let mut frame = ipv4(140, 100, 0);
        frame[ip4 + 6..ip4 + 8].copy_from_slice(&flags_offset.to_be_bytes());
        frame
    };
    // IPv4: the first fragment carries the TCP header, and counts what it carries; a later
    // one (offset 1,480 bytes) has none.
    assert_eq!(ingress.run(&with_fragment(0x2000)), counted(140, 100));
    let later = 1480 / 8;
    assert_eq!(ingress.run(&with_fragment(0x2000 | later)), UNPARSED);
    assert_eq!(ingress.run(&with_fragment(later)), UNPARSED);
    // IPv6: a destination options header before TCP (PadN only), a fragment header of a
    // first fragment, of a later one, and two headers (hop-by-hop with a router alert,
    // then destination options).
    let destination = [6, 0, 1, 4, 0, 0, 0, 0];
    assert_eq!(
        ingress.run(&ipv6_after(60, 128, &destination, 100)),
        UNPARSED
    );
    let first_fragment = [6, 0, 0, 1, 0, 0, 0, 7];
    assert_eq!(
        ingress.run(&ipv6_after(44, 128, &first_fragment, 100)),
        UNPARSED
    );
    let later_fragment = [6, 0, 0x05, 0xc8, 0, 0, 0, 7];
    assert_eq!(
        ingress.run(&ipv6_after(44, 128, &later_fragment, 100)),
        UNPARSED
    );
    let two = [60, 0, 5, 2, 0, 0, 1, 0, 6, 0, 1, 4, 0, 0, 0, 0];
    assert_eq!(ingress.run(&ipv6_after(0, 136, &two, 100)), UNPARSED);
    // Past the walk's reach, whatever follows: seven destination options headers, and
    // one of 520 bytes (a stack reads on; the upper layer is not looked for).
    let mut seven: Vec<u8> = (0..6).flat_map(|_| [60, 0, 1, 4, 0, 0, 0, 0]).collect();
    seven.extend([58, 0, 1, 4, 0, 0, 0, 0]);
    assert_eq!(ingress.run(&ipv6_after(60, 176, &seven, 100)), UNPARSED);
    let mut long = vec![0u8; 520];
    long[..2].copy_from_slice(&[58, 64]);
    assert_eq!(ingress.run(&ipv6_after(60, 640, &long, 100)), UNPARSED);
    // Not TCP: a later fragment of a UDP datagram, ICMPv6 behind a hop-by-hop header (MLD
    // reports carry one), ICMPv6 behind a fragment header. Nothing counted.
    let udp_fragment = [17, 0, 0x05, 0xc8, 0, 0, 0, 7];
    assert_eq!(
        ingress.run(&ipv6_after(44, 128, &udp_fragment, 100)),
        NOTHING
    );
    let mld = [58, 0, 5, 2, 0, 0, 1, 0];
    assert_eq!(ingress.run(&ipv6_after(0, 128, &mld, 100)), NOTHING);
    let icmp_fragment = [58, 0, 0, 1, 0, 0, 0, 7];
    assert_eq!(
        ingress.run(&ipv6_after(44, 128, &icmp_fragment, 100)),
        NOTHING
    );
}

/// A UDP packet with an IPv4 header under 20 bytes: no port can be read, so no DNS counter
/// takes it; malformed while DNS is counted, as a TCP one is always.
#[test]
fn a_udp_packet_with_a_short_ipv4_header_counts_as_malformed_while_dns_is_counted() {
    let mut frame = ipv4(140, 100, 0);
    frame[14] = 0x44;
    frame[14 + 9] = 17;
    let [ingress, loopback, egress, without_dns] = every_classifier();
    for dns in [ingress, loopback, egress] {
        assert_eq!(dns.run(&frame), MALFORMED);
    }
    assert_eq!(without_dns.run(&frame), NOTHING);
}

/// [`ipv4`]'s or [`ipv6`]'s frame with an 802.1Q tag inside it, after the addresses.
fn tagged_in_frame(mut frame: Vec<u8>) -> Vec<u8> {
    frame.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    frame
}

/// A VLAN tag inside the frame (a VLAN device with `reorder_hdr off` keeps it there): the
/// parsers read the IP header at 14 bytes and would take the tag for it. A TCP packet counts
/// as unparsed, anything else as nothing. (A test run gives the skb the frame's own type,
/// 802.1Q, as a VLAN device's egress has it; `tests/interfaces.rs` has the case where the
/// skb says IP, as its ingress has it, sent out of an egress hook.)
#[test]
fn a_vlan_tag_inside_the_frame_counts_as_unparsed() {
    let [ingress, _, egress, without_dns] = every_classifier();
    for classifier in [ingress, egress, without_dns] {
        assert_eq!(
            classifier.run(&tagged_in_frame(ipv4(140, 100, 0))),
            UNPARSED
        );
        assert_eq!(
            classifier.run(&tagged_in_frame(ipv6(120, &[], 100))),
            UNPARSED
        );
        let mut udp = tagged_in_frame(ipv4(140, 100, 0));
        udp[18 + 9] = 17;
        assert_eq!(classifier.run(&udp), NOTHING);
        // Untagged, the same frame counts as ever.
        assert_eq!(classifier.run(&ipv4(140, 100, 0)), counted(140, 100));
    }
}

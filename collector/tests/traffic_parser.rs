//! The live traffic counting of the classifiers on crafted TCP packets, run in the kernel
//! through `BPF_PROG_TEST_RUN`: the bytes counted are those the packet carries, never what
//! a header claims beyond them, and GSO packets over 64 KiB (BIG TCP) count whole.

mod support;

use aya::{
    EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use collector_common::{
    DIR_IN, GLOBAL_LOCAL_ONLY, LOCAL_ADDRESS_SLOTS, LOCAL_ADDRESS_WAYS, TrafficCounters,
    address_words, error_kind, local_address_set_bits, local_address_sets, map_names, port_bit,
    program_names, tally_table_len, traffic_index,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

const ROUTE_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40000;
const TCP_HLEN: usize = 20;
/// `TC_ACT_UNSPEC` as the kernel returns it: the packet continues unchanged.
const PASS: u32 = u32::MAX;

struct Ingress {
    ebpf: aya::Ebpf,
}

/// What one packet added: to the route's inbound counters, and to the truncated packets.
#[derive(Debug, PartialEq, Eq)]
struct Counted {
    packets: u64,
    bytes: u64,
    payload_bytes: u64,
    truncated: u64,
}

impl Ingress {
    /// The kernel object on its own, with [`ROUTE_PORT`] as route slot 0.
    fn load() -> Self {
        Self::load_with(0)
    }

    /// [`Self::load`], counting only packets to or from `LOCAL_ADDRESSES` if `local_only`
    /// is 1, as the agent loads it without `all_namespaces`.
    fn load_with(local_only: u32) -> Self {
        support::require_root();
        let table_len = tally_table_len(aya::util::nr_cpus().unwrap()).unwrap();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::DNS_NAMES, table_len)
            .map_max_entries(map_names::CONN_CLIENTS, table_len)
            .override_global(GLOBAL_LOCAL_ONLY, &local_only, true)
            .load(OBJECT)
            .unwrap();
        let program: &mut SchedClassifier = ebpf
            .program_mut(program_names::COUNT_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        program.load().unwrap();
        let mut ports: Array<_, u32> =
            Array::try_from(ebpf.map_mut(map_names::ROUTE_BY_PORT).unwrap()).unwrap();
        ports.set(u32::from(ROUTE_PORT), 1, 0).unwrap();
        let (word, bit) = port_bit(ROUTE_PORT);
        let mut bits: Array<_, u64> =
            Array::try_from(ebpf.map_mut(map_names::ROUTE_PORT_BITS).unwrap()).unwrap();
        bits.set(word, bit, 0).unwrap();
        Self { ebpf }
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
        let per_cpu = traffic.get(&traffic_index(0, DIR_IN), 0).unwrap();
        Counted {
            packets: per_cpu.iter().map(|c| c.packets).sum(),
            bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            payload_bytes: per_cpu.iter().map(|c| c.payload_bytes).sum(),
            truncated: errors
                .get(&error_kind::PACKET_TRUNCATED, 0)
                .unwrap()
                .iter()
                .sum(),
        }
    }

    /// Runs the ingress classifier on `frame`; what it counted.
    fn run(&self, frame: &[u8]) -> Counted {
        let before = self.totals();
        let program: &SchedClassifier = self
            .ebpf
            .program(program_names::COUNT_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let result = program.test_run(opts).unwrap();
        assert_eq!(result.return_value, PASS, "the classifier changed a fate");
        let after = self.totals();
        Counted {
            packets: after.packets - before.packets,
            bytes: after.bytes - before.bytes,
            payload_bytes: after.payload_bytes - before.payload_bytes,
            truncated: after.truncated - before.truncated,
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
/// between the IPv6 header and TCP, the first being the next header's type) and TCP
/// carrying `payload` bytes.
fn ipv6(payload_len: u16, extension: &[u8], payload: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = if extension.is_empty() { 6 } else { 0 };
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
        truncated: 0,
    }
}

const TRUNCATED: Counted = Counted {
    packets: 0,
    bytes: 0,
    payload_bytes: 0,
    truncated: 1,
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
    // IPv4 BIG TCP: a total length of 0.
    assert_eq!(ingress.run(&ipv4(0, 1000, 0)), counted(1040, 1000));
    // IPv6 BIG TCP without a hop-by-hop header: a payload length of 0.
    assert_eq!(ingress.run(&ipv6(0, &[], 1000)), counted(1060, 1000));
    // IPv6 BIG TCP as it has been built with one, holding only the jumbo payload option.
    let jumbo = [6, 0, 0xc2, 4, 0, 1, 0, 0];
    assert_eq!(ingress.run(&ipv6(0, &jumbo, 1000)), counted(1068, 1000));
    // Any other hop-by-hop header before TCP is not counted, as before.
    let other = [6, 0, 1, 4, 0, 0, 0, 0];
    assert_eq!(
        ingress.run(&ipv6(28 + 1000, &other, 1000)),
        Counted {
            packets: 0,
            bytes: 0,
            payload_bytes: 0,
            truncated: 0
        }
    );
}

/// The address look-up finds an address in any way of either of its two sets (the agent
/// puts it wherever it makes room), and nothing else; while the table is marked
/// incomplete the port alone decides.
#[test]
fn the_address_table_is_searched_in_both_sets_and_every_way() {
    let mut ingress = Ingress::load_with(1);
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
    let nothing = Counted {
        packets: 0,
        bytes: 0,
        payload_bytes: 0,
        truncated: 0,
    };
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), nothing);
    // `::`, what the free slots hold, is no one's.
    let mut unspecified = ipv6(120, &[], 100);
    unspecified[14 + 39] = 0;
    assert_eq!(ingress.run(&unspecified), nothing);
    // Incomplete: by port alone.
    ingress.set_table_complete(0);
    assert_eq!(ingress.run(&ipv4(140, 100, 0)), counted(140, 100));
}

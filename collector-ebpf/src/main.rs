//! Kernel programs of the collector: a sock_ops program that follows the lifecycle of
//! connections on watched ports, and one tc classifier per hook that counts live TCP traffic
//! per route and DNS on the DNS ports.
//! Counting only: no program changes the fate of a socket or a packet.
#![no_std]
#![no_main]
// Atomic compare-and-swap on the connection table (see connections.rs) and atomic adds to the
// counters sock_ops writes (`add`); the kernel crate is
// built with nightly anyway (build-std).
#![feature(core_intrinsics)]
// A word copied between unaligned addresses in one load and one store (`dns::copy_word`):
// LLVM's BPF backend splits an unaligned access into bytes, and its feature that would not
// splits stack accesses too, which the verifier refuses.
#![feature(asm_experimental_arch)]
#![allow(
    internal_features,
    reason = "atomic_cxchg: the BPF target has no AtomicU64 CAS; atomic_xadd beside it"
)]

mod connections;
mod dns;
mod packet;
mod server_names;
mod tally;
mod traffic;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    bindings::TC_ACT_UNSPEC,
    btf_maps::{Array, HashMap, PerCpuArray, ProgramArray, RingBuf, SkStorage},
    macros::{btf_map, cgroup_skb, classifier, sock_ops},
    programs::{SkBuffContext, SockOpsContext, TcContext},
};
use collector_common::{
    CONN_EVENTS_BYTES, CONN_TABLE_SLOTS, ClientSlot, ConnCounters, ConnDurations, ConnEvent,
    ConnState, DIR_IN, DIR_OUT, DNS_EVENTS_BYTES, DNS_INFLIGHT_SLOTS, DNS_MAX_PORTS,
    DNS_UPSTREAM_SLOTS, DnsCounters, DnsInFlight, DnsNameKeys, DnsNameSlot, DnsPorts,
    DnsQueryEvent, DnsScratch, ERROR_SLOTS, LOCAL_ADDRESS_SLOTS, MAP_FLAGS_MMAPABLE,
    MAX_REDIRECT_DEVICES, MAX_ROUTES, PORT_BITMAP_WORDS, PORT_SLOTS, RouteName, SNI_NAMES_MAX,
    SniCounters, SniDecision, SniKey, TALLY_SLOTS_PER_CPU, TrafficCounters, UpstreamCounters,
    conn_table_bits, dns_inflight_bits, local_address_set_bits,
};

use crate::packet::{ETH_HLEN, NO_LINK_HEADER};

/// Network namespace whose sockets are counted; 0 counts all. Set by the agent at load.
#[unsafe(no_mangle)]
static NETNS_COOKIE: Global<u64> = Global::new(0);

/// 1: live traffic counts only packets to (ingress) or from (egress) an address of
/// `LOCAL_ADDRESSES`, not those the host forwards. Set at load; read-only.
#[unsafe(no_mangle)]
static LOCAL_ONLY: Global<u32> = Global::new(0);
/// `LOCAL_ADDRESSES` has `2^LOCAL_ADDRESS_SET_BITS` sets. Set at load; read-only.
#[unsafe(no_mangle)]
static LOCAL_ADDRESS_SET_BITS: Global<u32> =
    Global::new(local_address_set_bits(LOCAL_ADDRESS_SLOTS));
/// The addresses of the agent's namespace, in sets of `LOCAL_ADDRESS_WAYS`; sized and kept
/// by the agent. Memory-mappable for its page alignment: each set is one cache line.
#[btf_map]
static LOCAL_ADDRESSES: Array<[u64; 2], { LOCAL_ADDRESS_SLOTS as usize }, MAP_FLAGS_MMAPABLE> =
    Array::new();
/// 1 while `LOCAL_ADDRESSES` holds every local address; 0 counts by port alone.
#[btf_map]
static LOCAL_ADDRESSES_COMPLETE: Array<u32, 1> = Array::new();
/// The namespace's ifb devices by index, 0 where unused; kept by the agent.
#[btf_map]
static REDIRECT_DEVICES: Array<[u32; MAX_REDIRECT_DEVICES], 1> = Array::new();

#[btf_map]
static ROUTE_BY_PORT: Array<u32, { PORT_SLOTS as usize }> = Array::new();
#[btf_map]
static ROUTE_PORT_BITS: Array<u64, { PORT_BITMAP_WORDS as usize }> = Array::new();
/// The network namespace whose collector owns the pins, and the layout its maps were made
/// with (`PIN_LAYOUT`); only the agent reads and writes it.
#[btf_map]
static PIN_OWNER: Array<u64, 2> = Array::new();
/// Kept beside the counters so that slots stay bound to the same route across restarts; only
/// the agent reads and writes it.
#[btf_map]
static ROUTE_NAMES: Array<RouteName, { MAX_ROUTES as usize }> = Array::new();
#[btf_map]
static CONN_COUNTERS: PerCpuArray<ConnCounters, { MAX_ROUTES as usize }> = PerCpuArray::new();
#[btf_map]
static CONN_DURATIONS: PerCpuArray<ConnDurations, { MAX_ROUTES as usize }> = PerCpuArray::new();
/// Remote TCP port → upstream slot + 1; written by the agent at every start.
#[btf_map]
static UPSTREAM_BY_PORT: Array<u32, { PORT_SLOTS as usize }> = Array::new();
#[btf_map]
static UPSTREAM_COUNTERS: PerCpuArray<UpstreamCounters, { MAX_ROUTES as usize }> =
    PerCpuArray::new();
/// Local ports shared by routes told apart by server name; written by the agent at every
/// start.
#[btf_map]
static SNI_PORT_BITS: Array<u64, { PORT_BITMAP_WORDS as usize }> = Array::new();
/// Port and server name → route slot + 1; written by the agent at every start.
#[btf_map]
static SNI_ROUTES: HashMap<SniKey, u32, { SNI_NAMES_MAX as usize }> = HashMap::new();
#[btf_map]
static SNI_COUNTERS: PerCpuArray<SniCounters, { MAX_ROUTES as usize }> = PerCpuArray::new();
#[btf_map]
static SNI_DECISIONS: SkStorage<SniDecision> = SkStorage::new();
/// Where a connection's hello goes on in a later segment; made only then.
#[btf_map]
static SNI_RESUME: SkStorage<server_names::SniResume> = SkStorage::new();
/// The first bytes of a server name a segment cut, until the next segment finishes it; made
/// only then.
#[btf_map]
static SNI_KEPT_NAME: SkStorage<server_names::SniKeptName> = SkStorage::new();
#[btf_map]
static SNI_SCRATCH: PerCpuArray<server_names::SniScratch, 1> = PerCpuArray::new();
/// `read_early_hellos`, set by the agent at load: `read_server_names` hands it the segments
/// of listening sockets.
#[btf_map]
static EARLY_HELLO_READER: ProgramArray<1> = ProgramArray::new();
#[btf_map]
static EARLY_HELLO: PerCpuArray<server_names::EarlyHello, 1> = PerCpuArray::new();
/// The name bytes kept with this CPU's `EARLY_HELLO`, for its accept.
#[btf_map]
static EARLY_KEPT_NAME: PerCpuArray<server_names::SniKeptName, 1> = PerCpuArray::new();
/// Sized by the agent at load (`connection_table_slots`): `2^CONN_TABLE_BITS` slots.
#[btf_map]
static CONN_STATE: Array<ConnState, { CONN_TABLE_SLOTS as usize }, MAP_FLAGS_MMAPABLE> =
    Array::new();
/// The bits of `CONN_STATE`'s size. Set at load; read-only.
#[unsafe(no_mangle)]
static CONN_TABLE_BITS: Global<u32> = Global::new(conn_table_bits(CONN_TABLE_SLOTS));
#[btf_map]
static CONN_EVENTS: RingBuf<ConnEvent, { CONN_EVENTS_BYTES as usize }> = RingBuf::new();
#[btf_map]
static CONN_STREAM_WANTED: Array<u32, 1> = Array::new();
/// Nonzero while a callback on this CPU is in `CONN_CLIENTS` (see `connections::count_client`).
#[btf_map]
static CONN_CLIENTS_BUSY: PerCpuArray<u32, 1> = PerCpuArray::new();
/// Sized by the agent at load: [`TALLY_SLOTS_PER_CPU`] slots per possible CPU.
#[btf_map]
static CONN_CLIENTS: Array<ClientSlot, { TALLY_SLOTS_PER_CPU as usize }, MAP_FLAGS_MMAPABLE> =
    Array::new();
#[btf_map]
static ROUTE_TRAFFIC: PerCpuArray<TrafficCounters, { (MAX_ROUTES * 2) as usize }> =
    PerCpuArray::new();
#[btf_map]
static ERRORS: PerCpuArray<u64, { ERROR_SLOTS as usize }> = PerCpuArray::new();

/// 1 keeps per-client figures (clients counted in `CONN_CLIENTS`, opens and closes sent to
/// the event stream); 0 counts without them. Set at load; read-only, so the verifier drops
/// that code.
#[unsafe(no_mangle)]
static CLIENT_EVENTS: Global<u32> = Global::new(1);

/// 1 follows this namespace's connections to the upstream ports (`UPSTREAM_BY_PORT`); 0 (no
/// upstream configured) leaves them alone. Set at load; read-only, so the verifier drops that
/// code when it is 0.
#[unsafe(no_mangle)]
static UPSTREAMS_WATCHED: Global<u32> = Global::new(0);

/// 1 when routes share ports by server name (`SNI_PORT_BITS`); 0 leaves that code out of the
/// `sock_ops` program. Set at load; read-only.
#[unsafe(no_mangle)]
static SNI_WATCHED: Global<u32> = Global::new(0);

/// DNS: 0 leaves DNS out of the classifiers (`[dns] enabled = false`). Set at load;
/// read-only, so the verifier drops the DNS code when it is 0.
#[unsafe(no_mangle)]
static DNS_ENABLED: Global<u32> = Global::new(1);

/// DNS: a query whose hash of client port and id falls below this is sampled: its name
/// counted, and while the event stream is read, the query and its answer streamed (`[dns]
/// sample_every`). Set at load; 2^32 samples every query, and the verifier then drops the
/// check.
#[unsafe(no_mangle)]
static DNS_SAMPLE_BELOW: Global<u64> = Global::new(1 << 32);

/// DNS: 1 matches responses to queries, 0 counts without the in-flight table. Set at load;
/// read-only, so the verifier drops the matching code when it is 0.
#[unsafe(no_mangle)]
static DNS_MATCH_RESPONSES: Global<u32> = Global::new(1);

/// DNS: with matching on, a query whose hash of client port and id falls below this is
/// matched to its response, the others are only counted (`[dns] match_every`). Set at load;
/// 2^32 matches every query, and the verifier then drops the check.
#[unsafe(no_mangle)]
static DNS_MATCH_BELOW: Global<u64> = Global::new(1 << 32);

/// DNS: the server and upstream ports. Set by the agent at load.
#[unsafe(no_mangle)]
static DNS_PORTS: Global<DnsPorts> = Global::new(DnsPorts {
    server: [0; DNS_MAX_PORTS],
    upstream: [0; DNS_MAX_PORTS],
});
#[btf_map]
static DNS_COUNTERS: PerCpuArray<DnsCounters, 1> = PerCpuArray::new();
/// Memory-mappable for its page alignment: each set of ways is one cache line. Sized by the
/// agent at load (`[dns] in_flight_slots`): `2^DNS_INFLIGHT_BITS` slots.
#[btf_map]
static DNS_INFLIGHT: Array<DnsInFlight, { DNS_INFLIGHT_SLOTS as usize }, MAP_FLAGS_MMAPABLE> =
    Array::new();
/// The bits of `DNS_INFLIGHT`'s size. Set at load; read-only.
#[unsafe(no_mangle)]
static DNS_INFLIGHT_BITS: Global<u32> = Global::new(dns_inflight_bits(DNS_INFLIGHT_SLOTS));
#[btf_map]
static DNS_UPSTREAM: Array<u64, { DNS_UPSTREAM_SLOTS as usize }> = Array::new();
#[btf_map]
static DNS_UPSTREAM_LATEST: Array<u64, 1> = Array::new();
#[btf_map]
static DNS_EVENTS: RingBuf<DnsQueryEvent, { DNS_EVENTS_BYTES as usize }> = RingBuf::new();
#[btf_map]
static DNS_SCRATCH: PerCpuArray<DnsScratch, 1> = PerCpuArray::new();
#[btf_map]
static DNS_STREAM_WANTED: Array<u32, 1> = Array::new();
/// Written by the agent at each start, before anything is attached.
#[btf_map]
static DNS_NAME_KEYS: Array<DnsNameKeys, 1> = Array::new();
/// Sized by the agent at load: [`TALLY_SLOTS_PER_CPU`] slots per possible CPU.
#[btf_map]
static DNS_NAMES: Array<DnsNameSlot, { TALLY_SLOTS_PER_CPU as usize }, MAP_FLAGS_MMAPABLE> =
    Array::new();

/// Count a kernel-side failure by kind (see `collector_common::error_kind`).
#[inline(always)]
fn count_error(kind: u32) {
    count_errors(kind, 1);
}

#[inline(always)]
fn count_errors(kind: u32, n: u64) {
    if let Some(counter) = ERRORS.get_ptr_mut(kind) {
        add(counter, n);
    }
}

/// Adds to a per-CPU counter that sock_ops callbacks write, atomically: a callback in
/// process context (a state change made by a system call, or a packet processed from a
/// socket's backlog when its lock is released) runs with softirqs on, so one in softirq
/// can interrupt it on the same CPU, and of two plain read-modify-writes one would be lost.
#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points to an aligned u64 of a map value, valid for the program's run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

#[sock_ops]
pub fn track_connections(ctx: SockOpsContext) -> u32 {
    connections::on_sock_op(&ctx);
    // 1 = carry on: sock_ops must never veto anything here.
    1
}

/// Reads the ClientHello of connections on ports shared by server name; attached only when
/// some are.
#[cgroup_skb(ingress)]
pub fn read_server_names(ctx: SkBuffContext) -> i32 {
    server_names::on_segment(&ctx);
    // 1 = pass: counting only.
    1
}

/// Reads hellos that arrive on a listening socket of a port shared by name, before their
/// connection is accepted; reached from `read_server_names` by a tail call, never attached.
#[cgroup_skb(ingress)]
pub fn read_early_hellos(ctx: SkBuffContext) -> i32 {
    server_names::on_early_segment(&ctx);
    // 1 = pass: counting only.
    1
}

/// One classifier per hook does both jobs, since a second program on a hook costs a
/// dispatch on every packet: TCP goes to the route counters, the rest to DNS while it is on
/// (TCP behind IPv6 extension headers too: the DNS parser walks them, and the walk counts it
/// as unparsed).
#[inline(always)]
fn for_dns<const L2: usize>(ctx: &TcContext) -> bool {
    DNS_ENABLED.load() != 0 && !packet::may_carry_tcp::<L2>(ctx)
}

/// A packet still carrying a VLAN tag in its metadata crosses the VLAN's own device too
/// (ingress: the tag is taken off before that device's hook runs again; egress: it is put on
/// after), and is counted there, once. A priority tag (VLAN 0) has no device of its own: the
/// stack delivers such a packet on this one, which counts it.
#[inline(always)]
fn tagged(ctx: &TcContext) -> bool {
    // SAFETY: context field reads, rewritten by the verifier.
    unsafe {
        let skb = &*ctx.skb.skb;
        skb.vlan_present != 0 && skb.vlan_tci & 0x0fff != 0
    }
}

/// Counts one packet after a link-layer header of `L2` bytes: at ingress (`dir` DIR_IN,
/// `dns_hook` HOOK_INGRESS) or egress. Inlined, so both are constants in each classifier.
#[inline(always)]
fn count<const L2: usize>(ctx: &TcContext, dir: u32, dns_hook: u32) -> i32 {
    if tagged(ctx) || (L2 == ETH_HLEN && packet::tag_in_frame(ctx)) {
        return TC_ACT_UNSPEC;
    }
    if for_dns::<L2>(ctx) {
        dns::count_packet::<L2>(ctx, dns_hook);
    } else {
        traffic::count_packet::<L2>(ctx, dir);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn count_ingress(ctx: TcContext) -> i32 {
    count::<ETH_HLEN>(&ctx, DIR_IN, dns::HOOK_INGRESS)
}

#[classifier]
pub fn count_egress(ctx: TcContext) -> i32 {
    count::<ETH_HLEN>(&ctx, DIR_OUT, dns::HOOK_EGRESS)
}

/// For interfaces whose packets start at the IP header (WireGuard, tun); attached only there.
#[classifier]
pub fn count_ingress_ip(ctx: TcContext) -> i32 {
    count::<NO_LINK_HEADER>(&ctx, DIR_IN, dns::HOOK_INGRESS)
}

/// The egress counterpart of [`count_ingress_ip`].
#[classifier]
pub fn count_egress_ip(ctx: TcContext) -> i32 {
    count::<NO_LINK_HEADER>(&ctx, DIR_OUT, dns::HOOK_EGRESS)
}

#[classifier]
pub fn count_loopback(ctx: TcContext) -> i32 {
    if for_dns::<ETH_HLEN>(&ctx) {
        dns::count_packet::<ETH_HLEN>(&ctx, dns::HOOK_LOOPBACK);
    } else {
        traffic::count_loopback_packet(&ctx);
    }
    TC_ACT_UNSPEC
}

/// Does nothing. Attached beside the classifiers only with `--bpf-stats`: its cost per run
/// under the same packets is what the statistics' own timing costs, the floor to subtract.
#[classifier]
pub fn stats_floor_tc(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Does nothing; the `sock_ops` counterpart of [`stats_floor_tc`].
#[sock_ops]
pub fn stats_floor_sock_ops(_ctx: SockOpsContext) -> u32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

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

pub mod client_hello;
pub mod proxy_header;
pub mod tcp_seq;

/// Route slots in the kernel's per-route arrays. A route's slot is stable across restarts.
pub const MAX_ROUTES: u32 = 256;
/// One entry per TCP port in [`ROUTE_BY_PORT`].
pub const PORT_SLOTS: u32 = 65536;
/// Log2 buckets of DNS response latency in microseconds ([`duration_bucket`]): bucket `i`
/// holds `[2^i, 2^(i+1))` µs (bucket 0 also anything under 1 µs); the last, from 2^31 µs
/// (36 minutes), is open-ended.
pub const DURATION_BUCKETS: u32 = 32;
/// Log2 buckets of connection lifetimes, as [`DURATION_BUCKETS`] but 40 of them: the last
/// finite one ends at 2^39 µs (6.4 days), as websocket and keep-alive connections live for
/// days (with 32, every lifetime over 36 minutes read as 36 minutes).
pub const CONN_DURATION_BUCKETS: u32 = 40;
/// Words of [`map_names::ROUTE_PORT_BITS`]: one bit per TCP port.
pub const PORT_BITMAP_WORDS: u32 = PORT_SLOTS / 64;
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
    /// `Array<u64>`, [`super::PORT_BITMAP_WORDS`] entries: bit `port % 64` of word
    /// `port / 64` is set for every port in [`ROUTE_BY_PORT`]. The per-packet check: 8 KiB
    /// stay in cache where the port map's 512 KiB (8 bytes per entry) do not, and every
    /// packet brings a client's ephemeral port.
    pub const ROUTE_PORT_BITS: &str = "ROUTE_PORT_BITS";
    /// `Array<RouteName>`, [`super::MAX_ROUTES`] entries: which route owns each slot,
    /// so that a restart with a reordered config keeps every route on its own counters.
    pub const ROUTE_NAMES: &str = "ROUTE_NAMES";
    /// `PerCpuArray<ConnCounters>`, one entry per route slot.
    pub const CONN_COUNTERS: &str = "CONN_COUNTERS";
    /// `PerCpuArray<ConnDurations>`, `MAX_ROUTES` entries: closed connections by duration.
    pub const CONN_DURATIONS: &str = "CONN_DURATIONS";
    /// `Array<u32>`, [`super::PORT_SLOTS`] entries: remote TCP port → upstream slot + 1
    /// (upstreams share the route slots). Written at every start, like [`ROUTE_BY_PORT`].
    pub const UPSTREAM_BY_PORT: &str = "UPSTREAM_BY_PORT";
    /// `PerCpuArray<UpstreamCounters>`, `MAX_ROUTES` entries: the connects of each
    /// upstream's slot (a route's slots stay 0).
    pub const UPSTREAM_COUNTERS: &str = "UPSTREAM_COUNTERS";
    /// `Array<u64>`, [`super::PORT_BITMAP_WORDS`] entries: the route ports some routes share
    /// by server name (`sni`), whose connections wait for their ClientHello.
    pub const SNI_PORT_BITS: &str = "SNI_PORT_BITS";
    /// `HashMap<SniKey, u32>`, [`super::SNI_NAMES_MAX`] entries: port and server name →
    /// route slot + 1. Written at every start.
    pub const SNI_ROUTES: &str = "SNI_ROUTES";
    /// `ProgramArray`, one entry: `read_early_hellos`, which `read_server_names` tail-calls
    /// for segments arriving on listening sockets; set at every start, not pinned (a crashed
    /// agent's entry is cleared with its last descriptor, and hellos before the accept count
    /// as missed until the next start).
    pub const EARLY_HELLO_READER: &str = "EARLY_HELLO_READER";
    /// `PerCpuArray<SniCounters>`, `MAX_ROUTES` entries: how the connections counted in each
    /// route slot by server name were told apart, and those still waiting for their hello.
    pub const SNI_COUNTERS: &str = "SNI_COUNTERS";
    /// Socket storage of [`super::SniDecision`]: where a connection on a port shared by name
    /// is counted, decided once, by its first segment or its close.
    pub const SNI_DECISIONS: &str = "SNI_DECISIONS";
    /// Socket storage, made only for a connection whose hello goes on past a segment or
    /// after a PROXY header's own: the sequence numbers the reader reads on from. Pinned with
    /// the decisions, so that a start after a crash reads on where the crashed run left off.
    pub const SNI_RESUME: &str = "SNI_RESUME";
    /// `Array<ConnState>`, `connection_table_slots` entries ([`super::CONN_TABLE_SLOTS`] by
    /// default): each open tracked connection,
    /// in a slot found from its socket cookie (see [`super::conn_slot`]). Memory-mappable:
    /// the agent counts the open connections per client in it at every poll.
    pub const CONN_STATE: &str = "CONN_STATE";
    /// `RingBuf` of [`super::ConnEvent`] and [`super::ConnClientEvent`].
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
    /// `Array<u32>`, one entry: nonzero while someone reads the event stream. Then every
    /// connection's open and close go to the ring, for the stream only (clients are counted
    /// in [`CONN_CLIENTS`] either way); otherwise neither is sent.
    pub const CONN_STREAM_WANTED: &str = "CONN_STREAM_WANTED";
    /// `Array<ClientSlot>` (memory-mappable), [`super::TALLY_SLOTS_PER_CPU`] entries per
    /// possible CPU, each CPU writing only its own: the clients whose connections it accepted
    /// lately, counted in place. Not pinned, like [`DNS_NAMES`].
    pub const CONN_CLIENTS: &str = "CONN_CLIENTS";
    /// `PerCpuArray<TrafficCounters>`, `MAX_ROUTES * 2` entries indexed by `slot * 2 + dir`.
    pub const ROUTE_TRAFFIC: &str = "ROUTE_TRAFFIC";
    /// `PerCpuArray<u64>`, [`super::ERROR_SLOTS`] entries: kernel-side failures by kind.
    pub const ERRORS: &str = "ERRORS";
    /// `PerCpuArray<DnsCounters>`, one entry.
    pub const DNS_COUNTERS: &str = "DNS_COUNTERS";
    /// `Array<DnsInFlight>`, sized by the agent at load ([`super::DNS_INFLIGHT_SLOTS`] by
    /// default).
    pub const DNS_INFLIGHT: &str = "DNS_INFLIGHT";
    /// `Array<u64>`, [`super::DNS_UPSTREAM_SLOTS`] entries: hash of name and QTYPE → time of
    /// the last upstream query for it.
    pub const DNS_UPSTREAM: &str = "DNS_UPSTREAM";
    /// `Array<u64>`, one entry: the time of the latest upstream query, for any name. A
    /// response whose query arrived after it is a hit without a look at [`DNS_UPSTREAM`].
    pub const DNS_UPSTREAM_LATEST: &str = "DNS_UPSTREAM_LATEST";
    /// `Array<u64>`, one entry, only the agent's: the cookie of the network namespace whose
    /// collector owns the pins. Link pins are named by interface index, which means
    /// something only in one namespace, so a collector of another one must not take them
    /// over.
    pub const PIN_OWNER: &str = "PIN_OWNER";
    /// `RingBuf` of [`super::DnsQueryEvent`], [`super::DnsAnswerEvent`] and
    /// [`super::DnsNameEvent`].
    pub const DNS_EVENTS: &str = "DNS_EVENTS";
    /// `PerCpuArray<DnsScratch>`, one entry: parse space, not data.
    pub const DNS_SCRATCH: &str = "DNS_SCRATCH";
    /// `Array<u32>`, one entry: nonzero while someone reads the event stream. Then every
    /// sampled query goes to the ring whole, and answers too; otherwise neither is sent.
    /// Query names are counted in [`DNS_NAMES`] either way.
    pub const DNS_STREAM_WANTED: &str = "DNS_STREAM_WANTED";
    /// `Array<DnsNameSlot>` (memory-mappable), [`super::TALLY_SLOTS_PER_CPU`] entries per
    /// possible CPU, each CPU writing only its own: the names its queries asked for lately,
    /// counted in place. Not pinned: its counts mean something only to the agent that knows
    /// the names.
    pub const DNS_NAMES: &str = "DNS_NAMES";
    /// `Array<DnsNameKeys>`, 1 entry: the name hash's keys, random (written by the agent
    /// before anything is attached). Pinned, and kept by a start after a crash: the stamps
    /// in [`DNS_UPSTREAM`] stay where the programs look for them, the crashed run's
    /// programs (still attached until replaced) and the new ones alike.
    pub const DNS_NAME_KEYS: &str = "DNS_NAME_KEYS";
    /// `Array<[u64; 2]>`, sized by the agent at load ([`super::local_address_slots`]): the
    /// addresses of the agent's namespace (IPv4 mapped into IPv6, as
    /// [`super::address_words`]), each in a slot of one of its two sets
    /// ([`super::local_address_sets`]), zero where free; kept by the agent; not pinned.
    pub const LOCAL_ADDRESSES: &str = "LOCAL_ADDRESSES";
    /// `Array<u32>`, 1 entry: 1 while `LOCAL_ADDRESSES` holds every local address; 0 (at
    /// load, or when one did not fit or a local route is wider than one address) counts by
    /// port alone, as without the table.
    pub const LOCAL_ADDRESSES_COMPLETE: &str = "LOCAL_ADDRESSES_COMPLETE";
    /// `Array<[u32; MAX_REDIRECT_DEVICES]>`, 1 entry: the indexes of this namespace's ifb
    /// devices (0 where unused), kept by the agent; not pinned. A packet an ifb hands back
    /// to the device that redirected it crosses that device's egress hook a second time,
    /// with the ifb as the interface it came in on: the classifiers leave that pass.
    pub const REDIRECT_DEVICES: &str = "REDIRECT_DEVICES";
}

/// Most ifb devices [`map_names::REDIRECT_DEVICES`] holds (compared in registers).
pub const MAX_REDIRECT_DEVICES: usize = 8;

/// Maps that outlive the agent, pinned under the pin directory: counters and per-socket and
/// per-query state. Configuration maps and the event rings are recreated at every start.
/// `PIN_OWNER` comes first: a clean stop removes it first, and a start removes the others
/// where it is missing.
pub const PINNED_MAPS: [&str; 16] = [
    map_names::PIN_OWNER,
    map_names::ROUTE_NAMES,
    map_names::CONN_COUNTERS,
    map_names::CONN_DURATIONS,
    map_names::UPSTREAM_COUNTERS,
    map_names::SNI_COUNTERS,
    map_names::SNI_DECISIONS,
    map_names::SNI_RESUME,
    map_names::CONN_STATE,
    map_names::ROUTE_TRAFFIC,
    map_names::ERRORS,
    map_names::DNS_COUNTERS,
    map_names::DNS_INFLIGHT,
    map_names::DNS_UPSTREAM,
    map_names::DNS_UPSTREAM_LATEST,
    map_names::DNS_NAME_KEYS,
];

/// Program names, as the kernel object declares them.
pub mod program_names {
    /// `sock_ops` program on the cgroup2 root: connection lifecycle.
    pub const TRACK_CONNECTIONS: &str = "track_connections";
    /// `cgroup_skb` ingress program on the cgroup2 root, attached only with routes by server
    /// name: reads the ClientHello of connections on ports they share.
    pub const READ_SERVER_NAMES: &str = "read_server_names";
    /// `cgroup_skb` ingress program reached from [`READ_SERVER_NAMES`] by a tail call: reads
    /// the hellos that arrive before their connection is accepted.
    pub const READ_EARLY_HELLOS: &str = "read_early_hellos";
    /// tc ingress classifier: live bytes and packets per route; DNS queries arriving for the
    /// server.
    pub const COUNT_INGRESS: &str = "count_ingress";
    /// tc egress classifier: live bytes and packets per route; DNS responses from the server
    /// and its upstream queries.
    pub const COUNT_EGRESS: &str = "count_egress";
    /// [`COUNT_INGRESS`] for interfaces whose packets start at the IP header (WireGuard,
    /// tun).
    pub const COUNT_INGRESS_IP: &str = "count_ingress_ip";
    /// [`COUNT_EGRESS`] for interfaces whose packets start at the IP header.
    pub const COUNT_EGRESS_IP: &str = "count_egress_ip";
    /// tc ingress classifier for loopback, counting both directions and all DNS messages
    /// (every packet sent on lo comes back in through its ingress).
    pub const COUNT_LOOPBACK: &str = "count_loopback";
    /// Empty tc classifier, attached only with `--bpf-stats`: the statistics' own cost.
    pub const STATS_FLOOR_TC: &str = "stats_floor_tc";
    /// Empty `sock_ops` program, attached only with `--bpf-stats`.
    pub const STATS_FLOOR_SOCK_OPS: &str = "stats_floor_sock_ops";
}

/// Global in the kernel object: the [`DnsPorts`].
pub const GLOBAL_DNS_PORTS: &str = "DNS_PORTS";

/// Global in the kernel object: 1 for per-client figures (clients counted in `CONN_CLIENTS`,
/// opens and closes sent while the event stream is read), 0 to count without them.
pub const GLOBAL_CLIENT_EVENTS: &str = "CLIENT_EVENTS";

/// Global in the kernel object: 1 follows the connections this namespace opens to the
/// upstream ports (`[[upstreams]]`), 0 (none configured) leaves that code out.
pub const GLOBAL_UPSTREAMS_WATCHED: &str = "UPSTREAMS_WATCHED";

/// Global in the kernel object: 1 when routes share ports by server name (`sni`), 0 leaves
/// that code out of the `sock_ops` program.
pub const GLOBAL_SNI_WATCHED: &str = "SNI_WATCHED";

/// Global in the kernel object: 1 to count DNS in the classifiers, 0 to leave it out.
pub const GLOBAL_DNS_ENABLED: &str = "DNS_ENABLED";

/// Global in the kernel object: a query (its name, its events) is sampled when its
/// [`dns_name_sample`] is below this ([`dns_match_below`] of `[dns] sample_every`; 2^32
/// samples every query).
pub const GLOBAL_DNS_SAMPLE_BELOW: &str = "DNS_SAMPLE_BELOW";

/// Global in the kernel object: 1 to match responses to their queries (latency, cache hits
/// and misses, unanswered queries), 0 to count without the in-flight table.
pub const GLOBAL_DNS_MATCH_RESPONSES: &str = "DNS_MATCH_RESPONSES";

/// Global in the kernel object (`u64`): with matching on, a query is matched to its response
/// when its [`dns_match_sample`] is below this ([`dns_match_below`] of `[dns] match_every`;
/// 2^32 matches every query).
pub const GLOBAL_DNS_MATCH_BELOW: &str = "DNS_MATCH_BELOW";

/// Global in the kernel object: the network namespace cookie whose sockets are counted
/// (0 counts every namespace).
pub const GLOBAL_NETNS_COOKIE: &str = "NETNS_COOKIE";

/// Global in the kernel object: 1 counts live traffic only to and from the addresses in
/// `LOCAL_ADDRESSES` (not what the host forwards); 0 by port alone (`all_namespaces`, where
/// the proxies are in other namespaces).
pub const GLOBAL_LOCAL_ONLY: &str = "LOCAL_ONLY";

/// Global in the kernel object: `LOCAL_ADDRESSES` has `2^bits` sets (set at load).
pub const GLOBAL_LOCAL_ADDRESS_SET_BITS: &str = "LOCAL_ADDRESS_SET_BITS";

/// Global in the kernel object: `CONN_STATE` has `2^bits` slots ([`conn_table_bits`]; set
/// at load).
pub const GLOBAL_CONN_TABLE_BITS: &str = "CONN_TABLE_BITS";

/// Global in the kernel object: `DNS_INFLIGHT` has `2^bits` slots ([`dns_inflight_bits`];
/// set at load).
pub const GLOBAL_DNS_INFLIGHT_BITS: &str = "DNS_INFLIGHT_BITS";

/// Fewest entries of `LOCAL_ADDRESSES` (the object's own size; 1 MiB): room for about
/// 60,000 addresses, so that a node whose agent starts before kube-proxy (IPVS mode) gives
/// it every service address still finds room for them.
pub const LOCAL_ADDRESS_SLOTS: u32 = 65_536;
/// Slots of a set of `LOCAL_ADDRESSES`: one 64-byte line, compared in place. A hash map's
/// look-up cost 25 ns a packet on a route port here, this about a fifth of that.
pub const LOCAL_ADDRESS_WAYS: u32 = 4;
/// Most entries of `LOCAL_ADDRESSES` (16 MiB).
const LOCAL_ADDRESS_SLOTS_MAX: u32 = 1 << 20;

/// Entries of `LOCAL_ADDRESSES` for a namespace with `addresses` addresses at the start:
/// eight slots for each (placed as a cuckoo hash places them, it holds over 90 % before
/// one is turned away, so the addresses may grow sevenfold), a power of two.
#[must_use]
pub fn local_address_slots(addresses: usize) -> u32 {
    let wanted = u32::try_from(addresses.saturating_mul(8)).unwrap_or(u32::MAX);
    wanted
        .checked_next_power_of_two()
        .unwrap_or(LOCAL_ADDRESS_SLOTS_MAX)
        .clamp(LOCAL_ADDRESS_SLOTS, LOCAL_ADDRESS_SLOTS_MAX)
}

/// `log2` of the sets of a table of `slots` entries.
#[must_use]
pub const fn local_address_set_bits(slots: u32) -> u32 {
    (slots / LOCAL_ADDRESS_WAYS).trailing_zeros()
}

/// The first slots of `address`'s two sets in a `LOCAL_ADDRESSES` of `2^set_bits` sets: an
/// address takes a free slot in either (the agent moves others to their other set to make
/// one). The set is
/// taken from the top bits of a multiplicative hash, which depend on every input bit.
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "shifted down to at most 32 bits"
)]
pub fn local_address_sets(address: [u64; 2], set_bits: u32) -> [u32; 2] {
    const SECOND: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let [high, low] = address;
    let mixed = high ^ low.rotate_left(29);
    let shift = 64 - set_bits.clamp(1, 32);
    [GOLDEN_RATIO_64, SECOND]
        .map(|factor| (mixed.wrapping_mul(factor) >> shift) as u32 * LOCAL_ADDRESS_WAYS)
}

/// Slots of the connection table by default (a power of two; `connection_table_slots`
/// sizes it at load, between [`CONN_TABLE_SLOTS_MIN`] and [`CONN_TABLE_SLOTS_MAX`]).
/// Tracking allocates and hashes nothing: socket storage allocated per socket (about 2 µs
/// per connection), a hash map cost a jhash, a bucket lock and cache misses per operation.
/// Socket cookies are sequential, so consecutive connections land in neighbouring slots.
pub const CONN_TABLE_SLOTS: u32 = 65536;
/// The fewest slots the connection table may be given.
pub const CONN_TABLE_SLOTS_MIN: u32 = 1 << 10;
/// The most: 48 MiB of kernel memory, which the agent also reads whole at every poll with
/// `client_stats` on.
pub const CONN_TABLE_SLOTS_MAX: u32 = 1 << 20;

/// Whether a connection table may have `slots` slots: a power of two between the bounds.
#[must_use]
pub const fn conn_table_slots_allowed(slots: u32) -> bool {
    power_of_two_within(slots, CONN_TABLE_SLOTS_MIN, CONN_TABLE_SLOTS_MAX)
}

/// `slots` is a power of two from `min` to `max`: a table sized at load, found by the low or
/// high bits of a hash.
const fn power_of_two_within(slots: u32, min: u32, max: u32) -> bool {
    slots.is_power_of_two() && min <= slots && slots <= max
}

/// The bits of a connection table of `slots` slots (a power of two): what [`conn_slot`]
/// takes.
#[must_use]
pub const fn conn_table_bits(slots: u32) -> u32 {
    slots.trailing_zeros()
}
/// Slots tried for a cookie before the table counts as full for it: four from the cookie's
/// own slot, then four from a slot scattered from it (see [`conn_slot`]).
pub const CONN_TABLE_PROBES: u32 = 8;

/// What the pinned maps' entries mean, beyond their shape: a start replaces a crashed run's
/// pins of another layout (the second word of [`map_names::PIN_OWNER`]) rather than misread
/// them, and `collector maps` refuses to decode them. Raise it with any change that keeps a
/// pinned map's shape and changes its meaning: [`conn_slot`]'s probe order (a close looked
/// for in other slots is never counted, and its slot never freed), the bits of
/// [`conn_flags`], what a counter counts. 1: from 2026-12-03.
pub const PIN_LAYOUT: u64 = 1;

/// Byte size of the connection event ring buffer.
pub const CONN_EVENTS_BYTES: u32 = 1 << 20;

/// Kernel-side failures, counted in [`map_names::ERRORS`] instead of changing a socket's or
/// packet's fate.
pub mod error_kind {
    /// No free slot among the probed ones of the connection table: the connection is
    /// counted as opened and as untracked (out of `active` at once), and its close,
    /// duration and bytes are lost.
    pub const CONN_TABLE_FULL: u32 = 0;
    /// The connection event ring buffer was full for an open or close event of the event
    /// stream: the stream's line is lost, counters are not.
    pub const CONN_EVENT_DROPPED: u32 = 1;
    /// A packet on a watched interface was too short to parse its headers, or shorter than
    /// its IP header says (the stack drops it; its claimed bytes are not counted).
    pub const PACKET_TRUNCATED: u32 = 2;
    /// A TCP packet on a watched interface whose headers contradict themselves: an IPv4
    /// header under 20 bytes, a TCP header (20 bytes, or its data offset) past the IP length,
    /// a data offset under 5 words, a zero IP length on a packet that is no GSO packet (only
    /// those over 64 KiB have one). A receiving stack drops it; nothing of it is counted.
    /// Like [`PACKET_TRUNCATED`], any TCP packet, whoever it is for, once per hook it
    /// crosses. While DNS is counted, a UDP packet with an IPv4 header under 20 bytes too
    /// (its ports cannot be read). And a packet whose IP header says another version than
    /// the skb's protocol: IPv4 if it carries TCP (or UDP, while DNS is counted), IPv6
    /// whatever it carries.
    pub const PACKET_MALFORMED: u32 = 3;
    /// A TCP packet on a watched interface whose ports the live counters cannot read: an
    /// IPv4 fragment after the first, IPv6 with extension headers before TCP (BIG TCP's
    /// hop-by-hop header aside; fragment headers included), or a VLAN tag inside the frame (a
    /// VLAN device with `reorder_hdr off`). Its bytes are in no route's live
    /// counters (a connection's exact bytes at its close do not depend on them). Like
    /// [`PACKET_TRUNCATED`], any TCP packet, once per hook it crosses. And any IPv6 packet
    /// whose extension headers run past six or 512 bytes into the frame, whatever it
    /// carries (a query or a segment may hide behind them).
    pub const PACKET_UNPARSED: u32 = 4;
    /// The connection event ring buffer was full for a client record (a client taking its
    /// slot of the client table): its connection is left out of the top clients, whose
    /// `maxUndercount` grows by these. Apart from [`CONN_EVENT_DROPPED`] since 2026-12-05,
    /// so that a stream overflowing the ring no longer widens that bound.
    pub const CONN_CLIENT_DROPPED: u32 = 5;
    /// A DNS name event (a name taking its slot of the name table) the full DNS ring had no
    /// room for, or a sampled name on a CPU beyond the table: that query is left out of the
    /// top domains, whose `maxUndercount` grows by these. Also counted in the DNS counters'
    /// `events_dropped`, with the stream's lines, which do not widen that bound (since
    /// 2026-12-05).
    pub const DNS_NAME_DROPPED: u32 = 6;
    /// DNS messages not counted because the kernel merged their datagrams into one packet
    /// with others of their flow (UDP GSO on sending, `rx-gro-list` or
    /// `rx-udp-gro-forwarding` on receiving): the first message of such a packet is counted,
    /// these are the others.
    pub const DNS_MERGED_UNCOUNTED: u32 = 7;
}
/// Number of error kinds.
pub const ERROR_KINDS: u32 = 8;
/// Entries of [`map_names::ERRORS`]: room for [`ERROR_KINDS`], with the kinds added since
/// the map was made (a kind added within it keeps the pinned map's shape, and its counters
/// across an upgrade after a crash). Full since `DNS_MERGED_UNCOUNTED`: the next kind takes
/// a larger map, whose pins a start after a crash replaces, counters from zero.
pub const ERROR_SLOTS: u32 = 8;
const _: () = assert!(ERROR_KINDS <= ERROR_SLOTS);
/// Names of the error kinds, indexed by kind, as exported in metric labels.
pub const ERROR_KIND_NAMES: [&str; ERROR_KINDS as usize] = [
    "conn_table_full",
    "conn_event_dropped",
    "packet_truncated",
    "packet_malformed",
    "packet_unparsed",
    "conn_client_dropped",
    "dns_name_dropped",
    "dns_merged_uncounted",
];

/// Most UDP ports of each kind in [`DnsPorts`].
pub const DNS_MAX_PORTS: usize = 8;

/// The DNS ports, set at load (global [`GLOBAL_DNS_PORTS`]): compared in registers, where a
/// port-indexed map costs a cache miss on every packet with a random client port. Unused
/// entries are 0, which matches no packet (port 0 is never counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsPorts {
    /// The local DNS server listens here: messages to it are client queries, from it
    /// responses.
    pub server: [u16; DNS_MAX_PORTS],
    /// Upstream servers listen here: a query leaving the host to one (from a port that is not
    /// a server port) is the server asking an upstream, i.e. a cache miss.
    pub upstream: [u16; DNS_MAX_PORTS],
}

/// Whether `port` is in `ports` (0 never is).
#[must_use]
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "runs in the DNS classifiers for every packet: eight compares beat a BPF call"
)]
pub fn dns_port_listed(ports: &[u16; DNS_MAX_PORTS], port: u16) -> bool {
    port != 0
        && (ports[0] == port
            || ports[1] == port
            || ports[2] == port
            || ports[3] == port
            || ports[4] == port
            || ports[5] == port
            || ports[6] == port
            || ports[7] == port)
}

/// Query types counted one by one: 0..=257 (every assigned type below 256, plus URI and
/// CAA); anything above falls into [`DNS_QTYPE_OTHER`]. Bounded whatever clients send.
pub const DNS_QTYPE_OTHER: u32 = 258;
/// Entries of [`DnsCounters::queries_by_qtype`] (258 types, "other", one spare for alignment).
pub const DNS_QTYPE_SLOTS: u32 = 260;

/// Why a DNS message was counted as malformed ([`DnsCounters::malformed`] index).
pub mod dns_malformed {
    /// Shorter than its 12-byte header, or its question runs past the end of the message.
    pub const TRUNCATED: u32 = 0;
    /// The UDP length field claims more than the packet holds, or less than a UDP header.
    pub const BAD_LENGTH: u32 = 1;
    /// A query without a question (QDCOUNT 0).
    pub const NO_QUESTION: u32 = 2;
    /// The question's name is invalid: a reserved label type (0x40, 0x80), a compression
    /// pointer (there is no earlier name to point to), or longer than 255 bytes.
    pub const BAD_NAME: u32 = 3;
    /// A response sent to the server's port, or a query sent from it.
    pub const WRONG_DIRECTION: u32 = 4;
    /// Over IPv6, a UDP checksum of zero, which a receiving socket drops (RFC 8200).
    pub const BAD_CHECKSUM: u32 = 5;
}
/// Entries of [`DnsCounters::malformed`] (six reasons, two spare for alignment).
pub const DNS_MALFORMED_SLOTS: u32 = 8;
/// Names of the malformed reasons, as exported in metric labels.
pub const DNS_MALFORMED_NAMES: [&str; 6] = [
    "truncated",
    "bad_length",
    "no_question",
    "bad_name",
    "wrong_direction",
    "bad_checksum",
];

/// Every DNS counter, in one per-CPU value: the agent reads them all with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsCounters {
    /// Client queries by QTYPE of the first question (see [`DNS_QTYPE_SLOTS`]).
    pub queries_by_qtype: [u64; DNS_QTYPE_SLOTS as usize],
    /// Client queries by OPCODE.
    pub queries_by_opcode: [u64; 16],
    /// Responses to clients by RCODE ([`dns_rcode_index`]): the header's four bits, with the
    /// upper eight of an EDNS OPT record that follows the first question.
    pub responses_by_rcode: [u64; DNS_RCODE_SLOTS as usize],
    /// Malformed messages on a server port, by [`dns_malformed`] reason.
    pub malformed: [u64; DNS_MALFORMED_SLOTS as usize],
    /// Answered queries by response latency, log2 µs buckets as [`duration_bucket`].
    pub latency: [u64; DURATION_BUCKETS as usize],
    /// Sum of the latencies in [`Self::latency`], in nanoseconds.
    pub latency_ns: u64,
    /// Responses with the TC bit set.
    pub responses_truncated: u64,
    /// Responses matched to their query in the in-flight table (each has a latency).
    pub answered: u64,
    /// Responses with no query in the in-flight table (untracked, or sent before we started).
    pub unmatched_responses: u64,
    /// Queries repeated with the same client address, port, id and question (its tag, see
    /// [`DNS_QUESTION_TAG_MASK`]) while in flight: the first one's time is kept.
    pub duplicate_queries: u64,
    /// Queries that found every slot of their in-flight set held by a query still waiting
    /// (younger than [`DNS_ANSWER_TIMEOUT_NS`]): not tracked, their latency is lost. The
    /// waiting ones keep their slots, so which queries lose their latency does not depend on
    /// how long they take.
    pub untracked_queries: u64,
    /// Queries still unanswered after [`DNS_ANSWER_TIMEOUT_NS`] when their slot was reused.
    pub unanswered_queries: u64,
    /// Matched responses with no upstream query for their name and type since the client
    /// asked.
    pub cache_hits: u64,
    /// Matched responses whose name and type the server asked an upstream for after the
    /// client asked.
    pub cache_misses: u64,
    /// Matched responses neither hit nor miss: those this namespace forwards rather than
    /// sends (their server is in another namespace behind a DNAT, a container's published
    /// port or a Service, whose upstream queries are not seen here), and those without a
    /// question (some FORMERR answers), whose name cannot be looked up.
    pub cache_undecided: u64,
    /// Queries from the host to an upstream port.
    pub upstream_queries: u64,
    /// Events lost because the ring buffer was full.
    pub events_dropped: u64,
    /// Client queries counted while matching was off (`[dns] match_responses = false`) or
    /// outside the matched sample (`[dns] match_every`): they took no in-flight slot, so the
    /// in-flight figure leaves them out.
    pub queries_unmatched: u64,
    /// Client queries by QCLASS of the first question ([`dns_qclass_index`]).
    pub queries_by_qclass: [u64; DNS_QCLASS_SLOTS as usize],
}

impl Default for DnsCounters {
    fn default() -> Self {
        Self {
            queries_by_qtype: [0; DNS_QTYPE_SLOTS as usize],
            queries_by_opcode: [0; 16],
            responses_by_rcode: [0; DNS_RCODE_SLOTS as usize],
            malformed: [0; DNS_MALFORMED_SLOTS as usize],
            latency: [0; DURATION_BUCKETS as usize],
            latency_ns: 0,
            responses_truncated: 0,
            answered: 0,
            unmatched_responses: 0,
            duplicate_queries: 0,
            untracked_queries: 0,
            unanswered_queries: 0,
            cache_hits: 0,
            cache_misses: 0,
            cache_undecided: 0,
            upstream_queries: 0,
            events_dropped: 0,
            queries_unmatched: 0,
            queries_by_qclass: [0; DNS_QCLASS_SLOTS as usize],
        }
    }
}

/// Slots of the DNS in-flight table by default (`[dns] in_flight_slots`; the agent sizes it
/// at load, a power of two between [`DNS_INFLIGHT_SLOTS_MIN`] and [`DNS_INFLIGHT_SLOTS_MAX`]):
/// one per outstanding query, in sets of [`DNS_INFLIGHT_WAYS`] found from a hash of (client
/// address, port, id). A fixed array instead of a hash map: a map insert and delete per query
/// cost about 220 ns here. 64 KiB: at 16,384 slots the queries' scattered lines cost dnsperf's
/// packets about 65 ns more each (docs/DESIGN.md, DNS, The in-flight table's size).
pub const DNS_INFLIGHT_SLOTS: u32 = 4096;
/// The fewest slots the in-flight table may be given: 64 sets.
pub const DNS_INFLIGHT_SLOTS_MIN: u32 = 1 << 8;
/// The most: 16 MiB of kernel memory, which the agent reads whole at every poll.
pub const DNS_INFLIGHT_SLOTS_MAX: u32 = 1 << 20;

/// Whether an in-flight table may have `slots` slots: a power of two between the bounds.
#[must_use]
pub const fn dns_inflight_slots_allowed(slots: u32) -> bool {
    power_of_two_within(slots, DNS_INFLIGHT_SLOTS_MIN, DNS_INFLIGHT_SLOTS_MAX)
}

/// The bits of an in-flight table of `slots` slots (a power of two): what
/// [`dns_inflight_set`] takes.
#[must_use]
pub const fn dns_inflight_bits(slots: u32) -> u32 {
    slots.trailing_zeros()
}

/// Slots a query may take in its set: a query finds one unless that many others of its set
/// are still waiting, so two queries that hash alike do not throw each other out.
pub const DNS_INFLIGHT_WAYS: u32 = 4;
/// Slots of the table of recent upstream queries, indexed by a hash of the name and QTYPE.
pub const DNS_UPSTREAM_SLOTS: u32 = 16384;
/// A query unanswered for this long is given up when its slot is needed.
pub const DNS_ANSWER_TIMEOUT_NS: u64 = 10_000_000_000;
/// Byte size of the DNS event ring buffer.
pub const DNS_EVENTS_BYTES: u32 = 1 << 21;
/// Longest name in wire form (RFC 1035 2.3.4).
pub const DNS_NAME_MAX: usize = 255;

/// Low bits of [`DnsInFlight::start_ns`] that hold a tag of the query's question instead of
/// time (a start up to 255 ns early): a response matches a waiting query only if it answers
/// the same question, so an id used again while an earlier query waits (a forwarder that
/// numbers its queries in turn, wrapping every 65,536) is another query, not that one.
pub const DNS_QUESTION_TAG_MASK: u64 = 0xff;

/// A query waiting for its response: one slot of the in-flight table. 16 bytes, four to a
/// cache line: the slot a query takes is cold and the response reads it on another CPU, so
/// its size is most of what latency tracking costs. The client address is kept as a
/// fingerprint (see [`client_fingerprint`]); port and id are kept whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsInFlight {
    /// `bpf_ktime_get_ns` when the query arrived, its low bits the question's tag
    /// ([`DNS_QUESTION_TAG_MASK`]); 0 = free slot.
    pub start_ns: u64,
    /// [`client_fingerprint`] of the client address.
    pub client: u32,
    /// Client port, host byte order.
    pub client_port: u16,
    /// DNS transaction id.
    pub id: u16,
}

/// [`DnsQueryEvent::kind`].
pub const DNS_EVENT_QUERY: u32 = 3;
/// [`DnsAnswerEvent::kind`].
pub const DNS_EVENT_ANSWER: u32 = 4;
/// [`DnsNameEvent::kind`].
pub const DNS_EVENT_NAME: u32 = 5;

/// Slots per CPU of a tally table ([`map_names::DNS_NAMES`], [`map_names::CONN_CLIENTS`]),
/// indexed by a hash of the key: a CPU counts a key in place while it keeps its slot, and
/// sends it to the agent only when it takes the slot.
pub const TALLY_SLOTS_PER_CPU: u32 = 1024;

/// Entries of a tally table for a host whose possible CPU ids run below `cpu_ids` (`None`:
/// too many).
#[must_use]
pub fn tally_table_len(cpu_ids: usize) -> Option<u32> {
    u32::try_from(cpu_ids)
        .ok()?
        .checked_mul(TALLY_SLOTS_PER_CPU)
}

/// A key (a name's hash, a client address) counted in place by one CPU: one slot of a tally
/// table. Only the owning CPU writes it; the agent reads `state` through a read-only
/// mapping while it changes, and learns the key from the event that claimed the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TallySlot<K> {
    /// Tenure and count in one word ([`tally_state`]), so that one load reads both as they
    /// were together, and one store moves both on. 0 = never used.
    pub state: u64,
    /// What the kernel matches.
    pub key: K,
}

/// A slot of `DNS_NAMES`: the key is the name's hash.
pub type DnsNameSlot = TallySlot<u64>;
/// A slot of `CONN_CLIENTS`: the key is the whole client address (IPv4 mapped into IPv6),
/// so that no address can pass for another.
pub type ClientSlot = TallySlot<[u64; 2]>;

/// Bits of [`TallySlot::state`] that count; the tenure is above them.
pub const TALLY_COUNT_BITS: u32 = 40;
/// Most one tenure counts; the next one starts a new tenure of the same key.
pub const TALLY_COUNT_MAX: u64 = (1 << TALLY_COUNT_BITS) - 1;
/// Tenures wrap below this, skipping 0. A slot changes tenure only with an event in the
/// ring, so between two reads of the agent it moves on at most as many times as the ring
/// holds records, far fewer than the tenures before a wrap.
pub const TALLY_TENURES: u32 = 1 << (64 - TALLY_COUNT_BITS);

/// A slot's state: the key's tenure (how many keys have held the slot, what the agent
/// matches on: a key that comes back is a new tenure) and what it counted there beyond the
/// one its claiming event carried.
#[inline]
#[must_use]
pub const fn tally_state(tenure: u32, count: u64) -> u64 {
    ((tenure as u64) << TALLY_COUNT_BITS) | (count & TALLY_COUNT_MAX)
}

/// The tenure in a slot's state.
#[inline]
#[must_use]
pub const fn tally_tenure(state: u64) -> u32 {
    (state >> TALLY_COUNT_BITS) as u32
}

/// The tenure after `tenure` (never 0, which marks a slot never used).
#[inline]
#[must_use]
pub const fn tally_next_tenure(tenure: u32) -> u32 {
    if tenure + 1 >= TALLY_TENURES {
        1
    } else {
        tenure + 1
    }
}

/// A name taking a slot of `DNS_NAMES`: it stands for the query that asked for it, and hands
/// over the previous tenure's final count. Its name (wire form, `name_len` bytes) follows in
/// the same ring record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsNameEvent {
    /// [`DNS_EVENT_NAME`].
    pub kind: u32,
    /// Index of the slot in `DNS_NAMES` (CPU × [`TALLY_SLOTS_PER_CPU`] + slot).
    pub slot: u32,
    /// The replaced tenure's final count.
    pub replaced_count: u64,
    /// The new name's tenure of the slot (the one after the replaced tenure).
    pub tenure: u32,
    /// Bytes of the name that follows.
    pub name_len: u16,
    pub _pad: u16,
}

/// A sampled client query, for the event stream and top domains. Its name (wire form,
/// `name_len` bytes) follows it in the same ring record: a record is about one cache line
/// instead of one sized for the longest name, so the ring holds about five times as many.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsQueryEvent {
    /// [`DNS_EVENT_QUERY`].
    pub kind: u32,
    pub qtype: u16,
    /// Client port, host byte order.
    pub client_port: u16,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
    pub timestamp_ns: u64,
    /// Client address; IPv4 as an IPv4-mapped IPv6 address.
    pub client_addr: [u8; 16],
    pub id: u16,
    /// Bytes of the name that follows: the wire-form name, root label included.
    pub name_len: u16,
    pub _pad: u32,
}

/// [`DnsAnswerEvent::cache_miss`] of a response relayed from another namespace's server.
pub const DNS_CACHE_UNDECIDED: u8 = 2;

/// A sampled response matched to its query.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsAnswerEvent {
    /// [`DNS_EVENT_ANSWER`].
    pub kind: u32,
    pub rcode: u8,
    /// 1 if an upstream was asked for the name (a cache miss), 0 for a hit,
    /// [`DNS_CACHE_UNDECIDED`] for neither (see [`DnsCounters::cache_undecided`]).
    pub cache_miss: u8,
    /// 1 if the TC bit was set.
    pub truncated: u8,
    /// The RCODE's upper eight bits, from an EDNS OPT record that follows the first question
    /// (0 where none does): the RCODE is `rcode_high << 4 | rcode`.
    pub rcode_high: u8,
    /// Time from query to response.
    pub latency_ns: u64,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
    pub timestamp_ns: u64,
    pub client_addr: [u8; 16],
    pub client_port: u16,
    pub id: u16,
    pub qtype: u16,
    pub _pad2: u16,
}

/// Per-CPU scratch space for a DNS message's first bytes (UDP header on), copied out of the
/// packet (from its linear part, else by `bpf_skb_load_bytes`) so that the name can be walked
/// at masked offsets. 8-aligned, so that the
/// name's hash can read it a word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct DnsScratch {
    pub bytes: [u8; DNS_SCRATCH_BYTES],
}
/// Size of [`DnsScratch`]: a power of two above UDP header + DNS header + name + type/class.
pub const DNS_SCRATCH_BYTES: usize = 512;
/// Bytes copied into [`DnsScratch`]: UDP header (8), DNS header (12), a longest name (255),
/// QTYPE and QCLASS (4), and the fixed part of an EDNS OPT record after them (11: the root
/// name, TYPE, CLASS, TTL and RDLENGTH), whose TTL holds the RCODE's upper bits.
pub const DNS_COPY_BYTES: usize = 8 + 12 + DNS_NAME_MAX + 4 + DNS_OPT_FIXED_BYTES;
/// An EDNS OPT record's bytes before its options (RFC 6891, 6.1.2).
pub const DNS_OPT_FIXED_BYTES: usize = 11;

const GOLDEN_RATIO_64: u64 = 0x9e37_79b9_7f4a_7c15;

/// Keys of a name's 32-bit halves in [`DnsNameKeys`]: 256 bytes' worth.
pub const DNS_NAME_KEY_HALVES: usize = 64;

/// The keys of the hash that names a DNS name in the kernel's tables ([`dns_name_hash_word`]),
/// random at each start: whoever sends queries does not know them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsNameKeys {
    /// The start value.
    pub seed: u64,
    /// The QTYPE's key (names hashed with their QTYPE: the upstream stamps).
    pub qtype: u64,
    /// One key per 32-bit half of the name's wire form.
    pub halves: [u64; DNS_NAME_KEY_HALVES],
}

/// Random bytes that make a [`DnsNameKeys`].
pub const DNS_NAME_KEY_BYTES: usize = size_of::<DnsNameKeys>();

impl DnsNameKeys {
    /// The keys that `random` bytes make (the agent's from /dev/urandom).
    #[must_use]
    pub fn from_random(random: &[u8; DNS_NAME_KEY_BYTES]) -> Self {
        let mut words = random.chunks_exact(8).map(|word| {
            u64::from_ne_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ])
        });
        let mut next = || words.next().unwrap_or(0);
        Self {
            seed: next(),
            qtype: next(),
            halves: core::array::from_fn(|_| next()),
        }
    }

    /// Written: a table never written holds zeros, with which every name hashes alike.
    #[must_use]
    pub fn is_set(&self) -> bool {
        *self != Self::from_random(&[0; DNS_NAME_KEY_BYTES])
    }
}

/// Adds the `word`-th eight bytes of a name's wire form (`value`, lower-cased, zero past
/// its end) to `hash`: multilinear, each 32-bit half times its own random 64-bit key, summed
/// mod 2^64, whose high 32 bits are strongly universal (Lemire and Kaser, "Strongly
/// universal string hashing is fast", 2014): two given names collide there with
/// probability 2^-32, and whoever chooses them cannot do better without the keys. (The
/// unkeyed multiply-and-rotate hash before it let anyone make a name that collides with any
/// other, counting one's queries as the other's.)
#[inline]
#[must_use]
pub fn dns_name_hash_word(hash: u64, keys: &DnsNameKeys, word: usize, value: u64) -> u64 {
    let at = (word & (DNS_NAME_KEY_HALVES / 2 - 1)) * 2;
    hash.wrapping_add(keys.halves[at].wrapping_mul(value & 0xffff_ffff))
        .wrapping_add(keys.halves[at + 1].wrapping_mul(value >> 32))
}

/// Eight bytes of a name with the ASCII capitals made small and every other byte left as
/// it is, all at once: names compare case-insensitively in DNS, and only A to Z fold
/// (setting bit 5 of every byte would also make `-` and `\r` one byte).
#[inline]
#[must_use]
pub const fn dns_lowercase_word(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Each byte's low seven bits plus a constant sets its high bit exactly when the byte is
    // at least that large, without a carry into the next byte (0x7f + 0x3f < 0x100).
    let low = word & !HIGH;
    let from_a = low + ONES * (0x80 - b'A' as u64);
    let past_z = low + ONES * (0x80 - b'Z' as u64 - 1);
    let capitals = from_a & !past_z & !word & HIGH;
    word | (capitals >> 2)
}

/// A 16-byte address as two words (native order), for compares and hashes a word at a time.
#[must_use]
pub fn address_words(addr: &[u8; 16]) -> [u64; 2] {
    let (high, low) = addr.split_at(8);
    let mut word = [0u8; 8];
    word.copy_from_slice(high);
    let high = u64::from_ne_bytes(word);
    word.copy_from_slice(low);
    [high, u64::from_ne_bytes(word)]
}

/// 32 bits standing for a client address in the in-flight table. Two clients that share a
/// port, an id, a set and a fingerprint at once would be confused: about one chance in 2^32
/// per pair of queries waiting in one set.
#[must_use]
pub fn client_fingerprint(client_addr: &[u8; 16]) -> u32 {
    let [high, low] = address_words(client_addr);
    // The top half of a multiplicative hash is the well-mixed one.
    ((high ^ low.rotate_left(29)).wrapping_mul(GOLDEN_RATIO_64) >> 32) as u32
}

/// First slot of the in-flight table's set for a query, in a table of `2^bits` slots
/// ([`dns_inflight_bits`]): the query may take any of the [`DNS_INFLIGHT_WAYS`] slots from
/// there, one 64-byte line of the memory-mapped table.
#[must_use]
pub fn dns_inflight_set(client: u32, client_port: u16, id: u16, bits: u32) -> u32 {
    let key = u64::from(client) << 32 | u64::from(client_port) << 16 | u64::from(id);
    // The top bits of a multiplicative hash are the well-mixed ones; never fewer than a
    // set's, so that a set lies in the table whatever `bits` says.
    let bits = bits.clamp(DNS_INFLIGHT_WAYS.trailing_zeros(), 32);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "`bits` of them, at most 32"
    )]
    let slot = (key.wrapping_mul(GOLDEN_RATIO_64) >> (64 - bits)) as u32;
    slot & !(DNS_INFLIGHT_WAYS - 1)
}

/// A hash of the query's client port and id: the query and its response are matched when
/// it is below [`dns_match_below`]. Both sides compute it from what they see, so a response
/// is looked for only if its query was remembered; the client address is left out so that
/// the queries left out cost no read of it. Another factor than [`dns_inflight_set`]'s, so
/// that the matched sample spreads over every set.
#[must_use]
pub fn dns_match_sample(client_port: u16, id: u16) -> u32 {
    const FACTOR: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let key = u64::from(client_port) << 16 | u64::from(id);
    (key.wrapping_mul(FACTOR) >> 32) as u32
}

/// A hash of the query's client port and id for `[dns] sample_every`: the query's name and
/// events, and its answer's event, are sampled when it is below [`dns_match_below`] of that.
/// From what the query and its answer both carry, so that the event stream holds both or
/// neither (a draw each left one streamed answer in N with its query); another factor than
/// [`dns_match_sample`]'s, so that the two samples are independent.
#[must_use]
pub fn dns_name_sample(client_port: u16, id: u16) -> u32 {
    // The fraction of √2 in 64 bits: consecutive ids (a client counting up) step by it round
    // the circle, which spreads any run of them evenly over the range. A factor near 2^64
    // stepped by a sliver of it, and a run of 64 ids fell all in or all out of a sample.
    const FACTOR: u64 = 0x6a09_e667_f3bc_c909;
    let key = u64::from(client_port) << 16 | u64::from(id);
    (key.wrapping_mul(FACTOR) >> 32) as u32
}

/// The bound under which [`dns_match_sample`] (or [`dns_name_sample`]) falls for one query in
/// `every` (exactly for a power of two); 2^32, every query, for 1.
#[must_use]
pub const fn dns_match_below(every: u32) -> u64 {
    (1u64 << 32) / if every == 0 { 1 } else { every as u64 }
}

/// The query that arrived at `start_ns` has waited past [`DNS_ANSWER_TIMEOUT_NS`] by `now`, and
/// is given up (unanswered). The difference is read as signed: another CPU may store a
/// start later than a `now` read just before, and a slot from "the future" is a query still
/// waiting, not one that wrapped around to 2^64 nanoseconds old.
#[must_use]
pub const fn dns_query_given_up(now: u64, start_ns: u64) -> bool {
    now.wrapping_sub(start_ns).cast_signed() > DNS_ANSWER_TIMEOUT_NS.cast_signed()
}

/// Entries of [`DnsCounters::queries_by_qclass`]: IN, CH, HS, NONE, ANY, and every other
/// class in the last.
pub const DNS_QCLASS_SLOTS: u32 = 6;

/// Index into [`DnsCounters::queries_by_qclass`] for a QCLASS: the classes a query is seen
/// with by name (IN; CH, the class of `version.bind` and `id.server` probes; HS; NONE and
/// ANY, RFC 2136 and 1035), the rest together.
#[must_use]
pub const fn dns_qclass_index(qclass: u16) -> u32 {
    match qclass {
        1 => 0,
        3 => 1,
        4 => 2,
        254 => 3,
        255 => 4,
        _ => DNS_QCLASS_SLOTS - 1,
    }
}

/// Entries of [`DnsCounters::responses_by_rcode`]: the RCODEs 0 to 30 (the header's sixteen,
/// and BADVERS, 16, to BADCOOKIE, 23, with the unassigned ones after), every larger one in
/// the last.
pub const DNS_RCODE_SLOTS: u32 = 32;

/// Index into [`DnsCounters::responses_by_rcode`] for an RCODE (up to 12 bits with EDNS).
#[must_use]
pub const fn dns_rcode_index(rcode: u16) -> u32 {
    if rcode as u32 >= DNS_RCODE_SLOTS - 1 {
        DNS_RCODE_SLOTS - 1
    } else {
        rcode as u32
    }
}

/// Index into [`DnsCounters::queries_by_qtype`] for a QTYPE.
#[must_use]
pub const fn dns_qtype_index(qtype: u16) -> u32 {
    if qtype as u32 >= DNS_QTYPE_OTHER {
        DNS_QTYPE_OTHER
    } else {
        qtype as u32
    }
}

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
    /// Connections opened on the route: accepted on its ports (on a port shared by server
    /// name, once the hello decides the route), or for an upstream, connected.
    pub opened: u64,
    /// Tracked connections that reached `TCP_CLOSE`.
    pub closed: u64,
    /// Payload bytes received from clients by closed connections.
    pub bytes_in: u64,
    /// Payload bytes sent to and acknowledged by clients, of closed connections.
    pub bytes_out: u64,
    /// Sum of the durations of closed connections, in microseconds: in nanoseconds it
    /// wrapped after 584 connection-years, two days with 100,000 connections open.
    pub duration_us: u64,
    /// Connections counted opened that the full connection table turned away: never
    /// counted closed (their close, duration and bytes are lost), so left out of `active`
    /// (while they stay open, it reads low by them: the next start lists them as open
    /// from before).
    pub untracked: u64,
}

/// The connects of one upstream (summed over CPUs by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    /// Connects to the upstream's ports that closed before their handshake completed.
    pub connect_failures: u64,
    /// Connects followed and not yet established or failed: 1 added on the connect's CPU,
    /// 1 taken off (a wrapping add) on whichever CPU ends it, so only the sum over CPUs
    /// means something. The CPUs' values are read one after another, so a read amid a
    /// handshake can see the end without the start: the agent reads a sum below 0 as 0.
    /// They hold slots of the connection table.
    pub connecting: u64,
}

/// Closed connections of one route by duration ([`duration_bucket`]): one value per route,
/// so that a poll reads a route's histogram with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnDurations {
    pub buckets: [u64; CONN_DURATION_BUCKETS as usize],
}

// Arrays over 32 have no derived `Default`.
impl Default for ConnDurations {
    fn default() -> Self {
        Self {
            buckets: [0; CONN_DURATION_BUCKETS as usize],
        }
    }
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
    /// A connection the proxy opened to an upstream (its `route` is the upstream's slot):
    /// not a client's, so left out of the per-client figures.
    pub const UPSTREAM: u32 = 8;
    /// An upstream connect whose handshake has not completed: a close now is a failure.
    pub const CONNECTING: u32 = 16;
    /// Accepted on a port shared by server name: its route is decided by its ClientHello
    /// (`SNI_DECISIONS`); `route` is the port's route without a name until its close.
    pub const BY_NAME: u32 = 32;
    /// Established by our own SYN meeting a SYN (a socket connected to its own port, or
    /// crossed SYNs), not accepted from a listener: `bytes_acked` counts that SYN as one
    /// byte, as an upstream's does.
    pub const SYN_ACKED: u32 = 64;
}

/// Server names (port and name pairs) the kernel's name map holds.
pub const SNI_NAMES_MAX: u32 = 4096;

/// Key of [`map_names::SNI_ROUTES`]: a local port and a server name in lower case, zero
/// after `len` bytes. A wildcard (`*.example.com`) is kept as the name after its first
/// label (`example.com`) with `wildcard` set: it stands for exactly one label more.
/// 4-aligned, so that the kernel zeroes the name four bytes at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniKey {
    pub port: u16,
    pub wildcard: u8,
    pub len: u8,
    pub name: [u8; client_hello::SNI_NAME_MAX + 1],
}

impl SniKey {
    /// The key of `name` (lower case, at most [`client_hello::SNI_NAME_MAX`] bytes) on
    /// `port`.
    #[must_use]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "names are at most 255 bytes (the config allows 253)"
    )]
    pub fn new(port: u16, wildcard: bool, name: &[u8]) -> Self {
        let mut key = Self {
            port,
            wildcard: u8::from(wildcard),
            len: name.len() as u8,
            name: [0; client_hello::SNI_NAME_MAX + 1],
        };
        key.name[..name.len()].copy_from_slice(name);
        key
    }
}

/// Where a connection on a port shared by name is counted: [`SNI_UNDECIDED`] until its
/// first segment or its close decides, then its route slot + 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SniDecision {
    pub route: u32,
    /// The slot of the port's route without a name, which takes what no name claims.
    pub fallback: u32,
}

/// [`SniDecision::route`] before the decision.
pub const SNI_UNDECIDED: u32 = 0;

/// How the connections counted in a route by server name were told apart: indices of
/// [`SniCounters::outcomes`].
pub mod sni_outcome {
    /// The ClientHello named a server name of the route.
    pub const MATCHED: u32 = 0;
    /// The ClientHello named a server name no route on the port has.
    pub const UNKNOWN_NAME: u32 = 1;
    /// A ClientHello without a server name.
    pub const NO_NAME: u32 = 2;
    /// The first segment (after a PROXY header, if any) was not a TLS ClientHello.
    pub const NOT_TLS: u32 = 3;
    /// The hello was cut where it cannot be read on (before its extensions, in an
    /// extension's header, or the body of its name's extension, over three segments, or
    /// over two TLS records), its name lay past 64 extensions in a segment, or a PROXY
    /// header was cut short.
    pub const INCOMPLETE: u32 = 4;
    /// A ClientHello whose lengths contradict each other, a name over 255 bytes, or a broken
    /// PROXY header.
    pub const MALFORMED: u32 = 5;
    /// Closed before the client sent anything (after a PROXY header, if any).
    pub const NO_DATA: u32 = 6;
    /// Data arrived that was not the connection's first (the first segment was not seen,
    /// or its start was out of order), or the close came with a hello not yet read.
    pub const MISSED: u32 = 7;
}

/// Slots of [`SniCounters::outcomes`].
pub const SNI_OUTCOMES: u32 = 8;

/// Names of the [`sni_outcome`]s, as metric labels.
pub const SNI_OUTCOME_NAMES: [&str; SNI_OUTCOMES as usize] = [
    "matched",
    "unknown_name",
    "no_name",
    "not_tls",
    "incomplete",
    "malformed",
    "no_data",
    "missed",
];

/// The server-name figures of one route slot (summed over CPUs by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SniCounters {
    /// Connections counted opened in this route by [`sni_outcome`].
    pub outcomes: [u64; SNI_OUTCOMES as usize],
    /// Connections accepted on a port whose route without a name is this one, still waiting
    /// for their first segment: counted opened nowhere yet, but holding table slots. A
    /// wrapping sum over CPUs, read as [`UpstreamCounters::connecting`] is.
    pub awaiting: u64,
}

/// State of a tracked connection, from accept to close: one slot of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Socket cookie of the connection owning the slot; 0 = free. Claimed and released
    /// atomically.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` at `PASSIVE_ESTABLISHED`, or for an upstream at `TCP_CONNECT`, read
    /// again at `ACTIVE_ESTABLISHED` (a simultaneous open keeps the connect's).
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

/// `BPF_F_MMAPABLE`, the flag of [`map_names::CONN_STATE`]: the agent maps the table into its
/// memory and reads it without a system call per slot.
pub const MAP_FLAGS_MMAPABLE: usize = 1 << 10;

/// [`ConnEvent::kind`] of a connection that was accepted.
pub const CONN_EVENT_OPEN: u32 = 1;
/// [`ConnEvent::kind`] of a connection that closed.
pub const CONN_EVENT_CLOSE: u32 = 2;
/// [`ConnClientEvent::kind`] (after the DNS event kinds, 3 to 5).
pub const CONN_EVENT_CLIENT: u32 = 6;
/// [`ConnClientEvent::slot`] of a connection counted for its client outside the table (a
/// callback nested in another on its CPU, or a CPU beyond the table).
pub const CLIENT_NO_SLOT: u32 = u32::MAX;

/// A client taking a slot of `CONN_CLIENTS`: it stands for the connection that brought it,
/// and hands over the previous tenure's final count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnClientEvent {
    /// [`CONN_EVENT_CLIENT`].
    pub kind: u32,
    /// Index of the slot in `CONN_CLIENTS` (CPU × [`TALLY_SLOTS_PER_CPU`] + slot).
    pub slot: u32,
    /// The replaced tenure's final count.
    pub replaced_count: u64,
    /// The new client's tenure of the slot (the one after the replaced tenure).
    pub tenure: u32,
    pub _pad: u32,
    /// Client address; IPv4 as an IPv4-mapped IPv6 address.
    pub client_addr: [u8; 16],
}

impl ConnClientEvent {
    /// `client_addr` taking `slot` for `tenure`, ending the tenure before at
    /// `replaced_count`.
    #[must_use]
    pub const fn new(slot: u32, tenure: u32, replaced_count: u64, client_addr: [u8; 16]) -> Self {
        Self {
            kind: CONN_EVENT_CLIENT,
            slot,
            replaced_count,
            tenure,
            _pad: 0,
            client_addr,
        }
    }
}

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
    /// Two fields, not an array: the kernel zeroed this 6-byte array with a call to a
    /// byte-wise `memset`.
    pub _pad: u16,
    pub _pad2: u32,
}

// The layouts are part of the kernel/user contract: pin them.
const _: () = assert!(size_of::<RouteName>() == 64);
const _: () = assert!(size_of::<ConnCounters>() == 48);
const _: () = assert!(size_of::<ConnDurations>() == 320);
const _: () = assert!(size_of::<TrafficCounters>() == 24);
const _: () = assert!(size_of::<ConnState>() == 48);
const _: () = assert!(core::mem::offset_of!(ConnState, client_addr) == 16);
const _: () = assert!(core::mem::offset_of!(ConnState, route) == 32);
const _: () = assert!(core::mem::offset_of!(ConnState, client_port) == 44);
const _: () = assert!(CONN_TABLE_SLOTS.is_power_of_two());
const _: () = assert!(
    conn_table_slots_allowed(CONN_TABLE_SLOTS_MIN)
        && conn_table_slots_allowed(CONN_TABLE_SLOTS)
        && conn_table_slots_allowed(CONN_TABLE_SLOTS_MAX)
);
const _: () = assert!(size_of::<ConnEvent>() == 72);
const _: () = assert!(size_of::<UpstreamCounters>() == 16);
const _: () = assert!(size_of::<SniKey>() == 260);
const _: () = assert!(align_of::<SniKey>() == 4 && core::mem::offset_of!(SniKey, name) == 4);
const _: () = assert!(size_of::<SniDecision>() == 8);
const _: () = assert!(size_of::<SniCounters>() == 72);
const _: () = assert!(core::mem::offset_of!(ConnEvent, client_addr) == 48);
const _: () = assert!(core::mem::offset_of!(ConnEvent, client_port) == 64);
const _: () = assert!(size_of::<DnsCounters>() == 8 * (260 + 16 + 32 + 8 + 32 + 13 + 6));
const _: () = assert!(core::mem::offset_of!(DnsCounters, latency_ns) == 8 * 348);
const _: () = assert!(size_of::<DnsInFlight>() == 16);
const _: () = assert!(size_of::<DnsPorts>() == 32);
const _: () = assert!(
    dns_inflight_slots_allowed(DNS_INFLIGHT_SLOTS_MIN)
        && dns_inflight_slots_allowed(DNS_INFLIGHT_SLOTS)
        && dns_inflight_slots_allowed(DNS_INFLIGHT_SLOTS_MAX)
);
const _: () = assert!(DNS_INFLIGHT_SLOTS_MIN >= DNS_INFLIGHT_WAYS);
const _: () = assert!((LOCAL_ADDRESS_SLOTS / LOCAL_ADDRESS_WAYS).is_power_of_two());
const _: () = assert!(LOCAL_ADDRESS_SLOTS_MAX.is_power_of_two());
const _: () = assert!(LOCAL_ADDRESS_WAYS as usize * size_of::<[u64; 2]>() == 64);
// A set fills one 64-byte line of the page-aligned (memory-mappable) table.
const _: () = assert!(DNS_INFLIGHT_WAYS as usize * size_of::<DnsInFlight>() == 64);
const _: () = assert!(DNS_UPSTREAM_SLOTS.is_power_of_two());
const _: () = assert!(size_of::<DnsQueryEvent>() == 40);
const _: () = assert!(size_of::<DnsNameEvent>() == 24);
const _: () = assert!(size_of::<DnsNameSlot>() == 16);
const _: () = assert!(size_of::<ClientSlot>() == 24);
const _: () = assert!(size_of::<ConnClientEvent>() == 40);
const _: () = assert!(core::mem::offset_of!(ConnClientEvent, client_addr) == 24);
const _: () = assert!(size_of::<DnsAnswerEvent>() == 48);
const _: () = assert!(core::mem::offset_of!(DnsAnswerEvent, client_addr) == 24);
const _: () = assert!(DNS_SCRATCH_BYTES.is_power_of_two() && DNS_COPY_BYTES < DNS_SCRATCH_BYTES);

/// Slot of a connection table of `2^bits` slots ([`conn_table_bits`]) for `cookie` at
/// `probe` (0..[`CONN_TABLE_PROBES`]).
#[must_use]
pub const fn conn_slot(cookie: u64, probe: u32, bits: u32) -> u32 {
    // Cookies are sequential (per CPU), so the first four probes run on from the cookie's low
    // bits: consecutive connections share cache lines, where a hashed start cost 25 ns more
    // per callback on average (cache misses). But a burst of long-lived connections holds a
    // run of slots that every cookie landing in it a table's length later would find taken:
    // the last four start from a multiplicative hash of the cookie and lie a quarter of the
    // table apart, so no run shorter than that holds them all.
    const RUN: u32 = CONN_TABLE_PROBES / 2;
    // Within the bounds the agent sizes the table to (the kernel reads them from rodata).
    let bits = if bits < 1 {
        1
    } else if bits > 31 {
        31
    } else {
        bits
    };
    let slots = 1u32 << bits;
    let spread = slots / RUN + 1;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "only the table's index bits are kept"
    )]
    let slot = if probe < RUN {
        (cookie as u32).wrapping_add(probe)
    } else {
        let scattered = (cookie.wrapping_mul(GOLDEN_RATIO_64) >> (64 - bits)) as u32;
        scattered.wrapping_add((probe - RUN) * spread)
    };
    slot & (slots - 1)
}

/// Word of [`map_names::ROUTE_PORT_BITS`] holding `port`'s bit, and the bit.
#[must_use]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Index into [`map_names::ROUTE_TRAFFIC`] for a route slot and direction.
#[must_use]
pub const fn traffic_index(slot: u32, dir: u32) -> u32 {
    slot * 2 + dir
}

/// Log2 bucket of a duration in nanoseconds, of `BUCKETS` (see [`DURATION_BUCKETS`]).
/// Branch-light and loop-free so the verifier sees a constant cost.
#[must_use]
pub const fn duration_bucket<const BUCKETS: u32>(duration_ns: u64) -> u32 {
    let micros = duration_ns / 1000;
    if micros == 0 {
        return 0;
    }
    let log2 = micros.ilog2();
    if log2 >= BUCKETS { BUCKETS - 1 } else { log2 }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers and byte arrays, with
    // explicit padding fields and sizes pinned above, so every bit pattern is valid.
    unsafe impl aya::Pod for super::RouteName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UpstreamCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SniKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SniDecision {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SniCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnDurations {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsInFlight {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsQueryEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsNameEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsAnswerEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsNameSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnClientEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsScratch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsNameKeys {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// A name's wire form hashed as the classifier hashes it (eight bytes at a time, A to Z
    /// folded, zero past its end).
    fn name_hash(keys: &DnsNameKeys, wire: &[u8]) -> u64 {
        let mut hash = keys.seed;
        for (word, chunk) in wire.chunks(8).enumerate() {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            let value = dns_lowercase_word(u64::from_le_bytes(bytes));
            hash = dns_name_hash_word(hash, keys, word, value);
        }
        hash
    }

    /// Keys from a splitmix64 sequence starting at `state`.
    fn keys(mut state: u64) -> DnsNameKeys {
        let mut random = [0u8; DNS_NAME_KEY_BYTES];
        for word in random.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_ne_bytes());
        }
        DnsNameKeys::from_random(&random)
    }

    #[test]
    fn names_made_to_collide_without_keys_do_not_collide_with_them() {
        // Equal under the unkeyed multiply-and-rotate hash (a top-bit difference cancelled
        // by the next word); tests/dns.rs sends them.
        let named = b"\x0aaaaaaaaaaa\x04test\x00";
        let crafted = b"\x0aaaaaaa\xe1aa!\x04test\x00";
        for start in 0..1000 {
            let keys = keys(start);
            assert!(keys.is_set());
            assert_ne!(
                name_hash(&keys, named) >> 32,
                name_hash(&keys, crafted) >> 32
            );
            // Case folds; the longest name reads every key, in bounds.
            assert_eq!(
                name_hash(&keys, b"\x03WWW\x04Test\x00"),
                name_hash(&keys, b"\x03www\x04test\x00")
            );
            let _ = name_hash(&keys, &[0x3f; 256]);
        }
        assert!(!DnsNameKeys::from_random(&[0; DNS_NAME_KEY_BYTES]).is_set());
    }

    #[test]
    fn a_tally_slots_state_holds_tenure_and_count() {
        let state = tally_state(7, 12);
        assert_eq!(tally_tenure(state), 7);
        assert_eq!(state & TALLY_COUNT_MAX, 12);
        let last = TALLY_TENURES - 1;
        assert_eq!(tally_tenure(tally_state(last, TALLY_COUNT_MAX)), last);
        assert_eq!(tally_next_tenure(last), 1);
        assert_eq!(tally_next_tenure(0), 1);
    }

    #[test]
    fn words_lowercase_as_bytes_do() {
        // Every byte value in every position, beside varied neighbours.
        for byte in 0..=255u8 {
            for position in 0..8 {
                let mut bytes = *b"Az-_09\x7f\x80";
                bytes[position] = byte;
                let word = u64::from_le_bytes(bytes);
                assert_eq!(
                    dns_lowercase_word(word),
                    u64::from_le_bytes(bytes.map(|b| b.to_ascii_lowercase())),
                    "{bytes:?}"
                );
            }
        }
    }

    #[test]
    fn duration_buckets_are_log2_microseconds() {
        let bucket = duration_bucket::<DURATION_BUCKETS>;
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(999), 0);
        assert_eq!(bucket(1_000), 0);
        assert_eq!(bucket(1_999), 0);
        assert_eq!(bucket(2_000), 1);
        assert_eq!(bucket(1_000_000), 9); // 1 ms = 2^9.97 µs
        assert_eq!(bucket(1_000_000_000), 19); // 1 s = 2^19.93 µs
        assert_eq!(bucket(u64::MAX), DURATION_BUCKETS - 1);
        // Connection lifetimes: an hour and a day get buckets of their own.
        let lifetime = duration_bucket::<CONN_DURATION_BUCKETS>;
        assert_eq!(lifetime(3_600_000_000_000), 31); // 2^31.7 µs
        assert_eq!(lifetime(86_400_000_000_000), 36); // 2^36.3 µs
        assert_eq!(lifetime(u64::MAX), CONN_DURATION_BUCKETS - 1);
    }

    /// A pinned connection table is read with the probe order it was written with: a
    /// change here must raise [`PIN_LAYOUT`], then these figures may follow.
    #[test]
    fn connection_slots_run_from_the_cookie_then_from_a_scattered_slot() {
        assert_eq!(PIN_LAYOUT, 1);
        let bits = conn_table_bits(CONN_TABLE_SLOTS);
        assert_eq!(bits, 16);
        assert_eq!(
            [1, 5, 1 << 20, u64::MAX].map(|cookie| conn_slot(cookie, 4, bits)),
            [40_503, 5_909, 39_831, 25_032]
        );
        let slots = CONN_TABLE_SLOTS - 1;
        assert_eq!(conn_slot(5, 0, bits), 5);
        assert_eq!(conn_slot(5, 3, bits), 8);
        assert_eq!(conn_slot(u64::from(CONN_TABLE_SLOTS) + 7, 0, bits), 7);
        assert_eq!(conn_slot(u64::from(slots), 1, bits), 0);
        for cookie in [1, 5, 1 << 20, u64::MAX] {
            let scattered = conn_slot(cookie, 4, bits);
            for probe in 5..CONN_TABLE_PROBES {
                assert_eq!(
                    conn_slot(cookie, probe, bits),
                    (scattered + (probe - 4) * 16_385) & slots
                );
            }
        }
    }

    /// Other sizes keep the order: four from the cookie's own slot, four a quarter of the
    /// table apart from a scattered one, all inside the table.
    #[test]
    fn connection_slots_stay_inside_a_table_of_any_size() {
        for slots in [CONN_TABLE_SLOTS_MIN, 1 << 12, CONN_TABLE_SLOTS_MAX] {
            let bits = conn_table_bits(slots);
            for cookie in [1, 5, 1 << 20, u64::MAX, u64::from(slots) + 3] {
                for probe in 0..CONN_TABLE_PROBES {
                    assert!(conn_slot(cookie, probe, bits) < slots);
                }
                assert_eq!(
                    u64::from(conn_slot(cookie, 0, bits)),
                    cookie & u64::from(slots - 1)
                );
                let scattered = conn_slot(cookie, 4, bits);
                assert_eq!(
                    conn_slot(cookie, 6, bits),
                    (scattered + 2 * (slots / 4 + 1)) & (slots - 1)
                );
            }
        }
    }

    /// Takes the first free slot of the probed ones, as the kernel's claim does.
    fn claim(taken: &mut [bool], cookie: u64, bits: u32) -> Option<usize> {
        let slot = (0..CONN_TABLE_PROBES)
            .map(|probe| conn_slot(cookie, probe, bits) as usize)
            .find(|&slot| !taken[slot])?;
        taken[slot] = true;
        Some(slot)
    }

    #[test]
    fn a_burst_of_long_lived_connections_turns_no_later_cookie_away() {
        for (slots, burst) in [(CONN_TABLE_SLOTS, 2000), (CONN_TABLE_SLOTS_MIN, 30)] {
            let bits = conn_table_bits(slots);
            let mut taken = std::vec![false; slots as usize];
            // A burst of connections with consecutive cookies stays open (a reconnect
            // storm)...
            for cookie in 1..=burst {
                assert!(claim(&mut taken, cookie, bits).is_some());
            }
            // ...while short ones open and close through four wraps of the table's length.
            // With four probes from the cookie's low bits only, 1,997 of every 65,536 found
            // all taken.
            let mut turned_away = 0;
            for cookie in burst + 1..burst + 1 + 4 * u64::from(slots) {
                match claim(&mut taken, cookie, bits) {
                    Some(slot) => taken[slot] = false,
                    None => turned_away += 1,
                }
            }
            assert_eq!(turned_away, 0, "{slots} slots");
        }
    }

    #[test]
    fn every_port_has_its_own_bit() {
        assert_eq!(port_bit(0), (0, 1));
        assert_eq!(port_bit(63), (0, 1 << 63));
        assert_eq!(port_bit(8080), (126, 1 << 16));
        assert_eq!(port_bit(u16::MAX), (PORT_BITMAP_WORDS - 1, 1 << 63));
    }

    #[test]
    fn traffic_indices_do_not_overlap() {
        assert_eq!(traffic_index(3, DIR_OUT), 7);
    }

    #[test]
    fn a_query_is_given_up_only_past_the_timeout_and_never_from_the_future() {
        const NOW: u64 = 500 * DNS_ANSWER_TIMEOUT_NS;
        assert!(!dns_query_given_up(NOW, NOW));
        assert!(!dns_query_given_up(NOW, NOW - DNS_ANSWER_TIMEOUT_NS));
        assert!(dns_query_given_up(NOW, NOW - DNS_ANSWER_TIMEOUT_NS - 1));
        assert!(dns_query_given_up(NOW, 1));
        // Stored by another CPU that read the clock after this one did.
        assert!(!dns_query_given_up(NOW, NOW + 1));
        assert!(!dns_query_given_up(NOW, NOW + 1_000_000));
        assert!(!dns_query_given_up(NOW, NOW + DNS_ANSWER_TIMEOUT_NS + 1));
        // Near the clock's start (a VM's monotonic clock starts at boot).
        assert!(!dns_query_given_up(5, 7));
        assert!(dns_query_given_up(DNS_ANSWER_TIMEOUT_NS + 8, 7));
    }

    #[test]
    fn any_run_of_consecutive_ids_has_its_share_in_the_name_sample() {
        for every in [2u32, 4, 16] {
            let below = dns_match_below(every);
            for port in (1024..=u16::MAX).step_by(1021) {
                let mut all = 0;
                for start in (0..u16::MAX - 64).step_by(64) {
                    let run = (start..start + 64)
                        .filter(|&id| u64::from(dns_name_sample(port, id)) < below)
                        .count();
                    let expected = 64 / every as usize;
                    assert!(
                        run.abs_diff(expected) <= 2,
                        "1 in {every}, port {port}, ids {start}..: {run}"
                    );
                    all += run;
                }
                let runs = usize::from((u16::MAX - 64) / 64 + 1);
                assert!(
                    all.abs_diff(runs * 64 / every as usize) <= runs / 8,
                    "{every} {port}"
                );
            }
        }
    }

    #[test]
    fn the_name_sample_and_the_matched_sample_are_independent() {
        for (match_every, sample_every) in [(4u32, 4u32), (16, 4), (2, 16)] {
            let (match_below, sample_below) =
                (dns_match_below(match_every), dns_match_below(sample_every));
            for port in (1024..=u16::MAX).step_by(4093) {
                let both = (0..=u16::MAX)
                    .filter(|&id| {
                        u64::from(dns_match_sample(port, id)) < match_below
                            && u64::from(dns_name_sample(port, id)) < sample_below
                    })
                    .count();
                let expected = 65_536 / (match_every * sample_every) as usize;
                assert!(
                    both.abs_diff(expected) <= expected / 50,
                    "1 in {match_every} and 1 in {sample_every}, port {port}: {both}"
                );
            }
        }
    }

    #[test]
    fn every_set_lies_in_an_in_flight_table_of_any_allowed_size_and_small_tables_fill() {
        let client = client_fingerprint(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        // A size no config gives is clamped, not a shift past the word.
        for bits in [0, 1, 33, u32::MAX] {
            let set = dns_inflight_set(client, 5353, 1, bits);
            assert_eq!(set % DNS_INFLIGHT_WAYS, 0, "{bits}: {set}");
        }
        assert_eq!(dns_inflight_set(client, 5353, 1, 0), 0);
        let allowed = (0..32).map(|bits| 1u32 << bits);
        for slots in allowed.filter(|&slots| dns_inflight_slots_allowed(slots)) {
            let bits = dns_inflight_bits(slots);
            let mut sets = std::collections::BTreeSet::new();
            for port in [5353, 40_000] {
                for id in 0..=u16::MAX {
                    let set = dns_inflight_set(client, port, id, bits);
                    assert!(set + DNS_INFLIGHT_WAYS <= slots, "{slots}: {set}");
                    assert_eq!(set % DNS_INFLIGHT_WAYS, 0, "{slots}: {set}");
                    sets.insert(set);
                }
            }
            // 131,072 queries: every set of a small table, a third of the largest's 262,144.
            let all = (slots / DNS_INFLIGHT_WAYS) as usize;
            assert!(
                sets.len() >= all.min(131_072) / 3,
                "{slots}: {}",
                sets.len()
            );
            if slots <= DNS_INFLIGHT_SLOTS {
                assert_eq!(sets.len(), all, "{slots}");
            }
        }
    }

    #[test]
    fn one_query_in_n_is_matched_and_the_sample_spreads_over_every_set() {
        let client = client_fingerprint(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(dns_match_below(1), 1 << 32);
        for every in [2u32, 3, 16, 256] {
            let below = dns_match_below(every);
            // Sequential ids from one port (as dnsperf sends), then every id of many ports.
            let sequential = (0..=u16::MAX)
                .filter(|&id| u64::from(dns_match_sample(5353, id)) < below)
                .count();
            let mut sets = std::collections::BTreeSet::new();
            let mut matched = 0;
            for port in 1024..1024 + 64 {
                for id in 0..=u16::MAX {
                    if u64::from(dns_match_sample(port, id)) < below {
                        matched += 1;
                        sets.insert(dns_inflight_set(
                            client,
                            port,
                            id,
                            dns_inflight_bits(DNS_INFLIGHT_SLOTS),
                        ));
                    }
                }
            }
            let expected = 65_536.0 / f64::from(every);
            let share = |n: usize, of: f64| f64::from(u32::try_from(n).unwrap()) / of;
            assert!(
                (share(sequential, expected) - 1.0).abs() < 0.02,
                "{every}: {sequential}"
            );
            assert!(
                (share(matched, 64.0 * expected) - 1.0).abs() < 0.02,
                "{every}: {matched}"
            );
            // A sample confined to some sets would fill them: the matched queries reach all
            // (at 256 or more a set on average).
            if every > 16 {
                continue;
            }
            assert_eq!(
                sets.len(),
                (DNS_INFLIGHT_SLOTS / DNS_INFLIGHT_WAYS) as usize,
                "{every}"
            );
        }
    }
}

//! DNS on the configured UDP ports, counted by the tc classifiers: the header and the first
//! question are parsed with a bounds check on every read, and every message ends up in exactly
//! one place: a query (by QTYPE and OPCODE), a response (by RCODE), an upstream query, or a
//! malformed reason. Nothing here changes a packet's fate.
//!
//! Where a message is seen:
//! - ingress (not loopback): to a server port = a client query;
//! - egress (not loopback): from a server port = a response; to an upstream port from any
//!   other port = the server asking an upstream;
//! - loopback, one ingress hook (every packet sent on lo comes back in through it): all three,
//!   in that order of precedence.
//!
//! Latency: a query takes a free slot of its set of the in-flight table, found from a hash of
//! (client address, port, id); its response frees it. Cache misses: an upstream query stamps a
//! table indexed by a hash of its name and QTYPE; a response whose name and QTYPE were stamped
//! after its query arrived is a miss.
//! A response whose query arrived after the latest upstream query, for any name, is a hit
//! without that look-up. A response this namespace forwards (its server is behind a DNAT in
//! another namespace, whose upstream queries leave from there) is neither: undecided.
//! With `[dns] match_every = N` only the queries whose hash of client port and id falls in one
//! N-th of its range are remembered, and only their responses looked for: the others cost
//! neither the clock nor the table.
//! With `[dns] match_responses = false` none of this runs: the same messages are counted, at
//! half or less of the cost per packet under load (docs/BENCHMARKS.md).
//!
//! Names: a sampled query's name is counted in this CPU's slot of the name table, and goes
//! to the ring only when it takes the slot; while someone reads the event stream, every
//! sampled query also goes to the ring whole, for the stream.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use collector_common::{
    DNS_CACHE_UNDECIDED, DNS_COPY_BYTES, DNS_EVENT_ANSWER, DNS_EVENT_NAME, DNS_EVENT_QUERY,
    DNS_INFLIGHT_WAYS, DNS_NAME_MAX, DNS_OPT_FIXED_BYTES, DNS_QUESTION_TAG_MASK, DNS_SCRATCH_BYTES,
    DNS_UPSTREAM_SLOTS, DURATION_BUCKETS, DnsAnswerEvent, DnsCounters, DnsInFlight, DnsNameEvent,
    DnsQueryEvent, client_fingerprint, dns_inflight_set, dns_lowercase_word, dns_malformed,
    dns_match_sample, dns_name_hash_word, dns_name_sample, dns_port_listed, dns_qclass_index,
    dns_qtype_index, dns_query_given_up, dns_rcode_index, duration_bucket, error_kind,
};

use crate::{
    DNS_COUNTERS, DNS_EVENTS, DNS_INFLIGHT, DNS_INFLIGHT_BITS, DNS_MATCH_BELOW,
    DNS_MATCH_RESPONSES, DNS_NAME_KEYS, DNS_NAMES, DNS_PORTS, DNS_SAMPLE_BELOW, DNS_SCRATCH,
    DNS_STREAM_WANTED, DNS_UPSTREAM, DNS_UPSTREAM_LATEST, count_error, count_errors,
    packet::{
        ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, MAX_L4_OFFSET, be16_at,
        ether_type, fixed_header, forwarded, handed_back_by_ifb, ipv6_upper_layer, or_pulled, ours,
        ptr_at, ptr_at_or_pulled, read_be16, wrong_ip_version,
    },
    tally::{Tally, tally},
};

/// Which hook a classifier runs at.
pub const HOOK_INGRESS: u32 = 0;
pub const HOOK_EGRESS: u32 = 1;
pub const HOOK_LOOPBACK: u32 = 2;

const UDP_HLEN: usize = 8;
const DNS_HLEN: usize = 12;
/// Where the copy of the packet (from the UDP header on) starts in scratch: far enough in
/// that an event's fixed part fits right before the name, so that event and name go to the
/// ring as one piece of scratch ([`send_with_name`]).
const COPY_AT: usize = 28;
/// Offset of the DNS header in scratch.
const DNS_AT: usize = COPY_AT + UDP_HLEN;
/// Offset of the question's name in scratch.
const NAME_AT: usize = DNS_AT + DNS_HLEN;
const _: () = assert!(NAME_AT.is_multiple_of(8) && NAME_AT + DNS_NAME_MAX <= PARK_END);
// The copy never reaches the parked values, which are parked before it.
const _: () = assert!(COPY_AT + DNS_COPY_BYTES <= PARK_END);
/// Keeps scratch offsets provably inside the buffer for the verifier.
const MASK: usize = DNS_SCRATCH_BYTES - 1;

/// Compare-and-swap attempts at raising `DNS_UPSTREAM_LATEST`.
const UPSTREAM_LATEST_TRIES: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Role {
    /// A client's query to the server.
    Query,
    /// The server's response to a client.
    Response,
    /// The server's query to an upstream.
    Upstream,
    /// A response this namespace forwards from a server port: its server is another
    /// namespace's, behind a DNAT to it.
    Relayed,
}

/// Where the UDP datagram sits in the packet.
struct Datagram {
    /// Offset of the UDP header.
    l4: usize,
    /// Bytes from the UDP header to the end of the IP payload; 0 when the IP length runs
    /// past the packet (see `within`).
    available: usize,
    /// First fragment of a fragmented datagram: the rest of it is in later packets.
    fragmented: bool,
    ipv6: bool,
}

/// Where the addresses and ports are, after the name walk.
struct Located {
    /// Offset of the UDP header.
    l4: usize,
    ipv6: bool,
}

/// The first question, or why it could not be read (then `name_len` is 0: a name takes at least
/// its root label). Every field is set on every path: with a `Result` the error path leaves
/// the QTYPE undefined, LLVM may fill it from any register, and a pointer spilled in part is
/// refused by the verifier (as it was under BPF v3).
struct Question {
    /// Wire length of the name, root label included.
    name_len: usize,
    qtype: u16,
    qclass: u16,
    /// The malformed reason when `name_len` is 0.
    malformed: u32,
}

impl Question {
    const fn unreadable(reason: u32) -> Self {
        Self {
            name_len: 0,
            qtype: 0,
            qclass: 0,
            malformed: reason,
        }
    }

    fn valid(self) -> Result<Self, u32> {
        if self.name_len == 0 {
            Err(self.malformed)
        } else {
            Ok(self)
        }
    }
}

/// Counts one packet, if it is DNS on a watched port. Always inlined so that `hook` is a
/// constant in each classifier and the port choice folds away.
#[inline(always)]
pub fn count_packet<const L2: usize>(ctx: &TcContext, hook: u32) {
    let Some(datagram) = locate::<L2>(ctx) else {
        return;
    };
    // Headers outside the linear part are pulled in (see `locate`), the UDP header here if
    // the IP header was linear without it. Only headers: the message is copied to scratch from
    // the linear part where it lies there, else with `bpf_skb_load_bytes`, which reads pages
    // too, so pulling it would only copy it twice.
    let Some(ports) = ptr_at_or_pulled::<[u8; 4]>(ctx, datagram.l4, datagram.l4 + UDP_HLEN) else {
        return;
    };
    // SAFETY: ptr_at checked the four bytes.
    let [src_high, src_low, dst_high, dst_low] = unsafe { *ports };
    let src_port = u16::from_be_bytes([src_high, src_low]);
    let dst_port = u16::from_be_bytes([dst_high, dst_low]);
    let ports = DNS_PORTS.load();
    let to_server = hook != HOOK_EGRESS && dns_port_listed(&ports.server, dst_port);
    let role = if to_server {
        Role::Query
    } else if hook != HOOK_INGRESS && dns_port_listed(&ports.server, src_port) {
        // After the DNAT's reverse its source is ours, but the server that answered, and
        // whatever it asked upstream, lie behind another interface.
        if hook == HOOK_EGRESS && forwarded(ctx) {
            Role::Relayed
        } else {
            Role::Response
        }
    } else if hook != HOOK_INGRESS && dns_port_listed(&ports.upstream, dst_port) {
        // A query this namespace forwards is another host's, even masqueraded.
        if hook == HOOK_EGRESS && forwarded(ctx) {
            return;
        }
        Role::Upstream
    } else {
        return;
    };
    // A query to this namespace's server, or a message from it; on loopback, all are. An
    // ifb's second pass through an egress hook was counted at the first.
    if (hook != HOOK_LOOPBACK && !ours::<L2>(ctx, datagram.ipv6, role == Role::Query))
        || (hook == HOOK_EGRESS && handed_back_by_ifb(ctx))
    {
        return;
    }
    let Some(counters) = DNS_COUNTERS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value; BPF programs run with migration disabled, and tc programs do
    // not nest on a CPU.
    let counters = unsafe { &mut *counters };
    let merged = merged_segments(ctx, &datagram);
    // What goes upstream is told by its ports alone, so what does not parse there is some
    // other program's (`traceroute -U` sends to port 53), not a malformed message. (The
    // datagrams merged with it are said apart all the same: a branch on what the parse
    // found took the verifier past its limit.)
    if let Err(reason) = count_message::<L2>(ctx, &datagram, merged.size, role, counters)
        && role != Role::Upstream
    {
        counters.malformed[(reason & 7) as usize] += 1;
    }
    if merged.count > 1 {
        count_errors(error_kind::DNS_MERGED_UNCOUNTED, merged.count - 1);
    }
}

/// The datagrams in a packet: one, or where the kernel merged a flow's datagrams into one
/// packet (UDP GSO on sending, UDP GRO on receiving: one UDP header, then each datagram's
/// payload in turn, `gso_size` bytes each but the last), one per segment. Only the first
/// segment's message is parsed and counted: a walk of the others, inlined or in a
/// `bpf_loop` callback, takes the verifier past its million instructions (docs/DESIGN.md,
/// DNS), so they are said apart.
struct Merged {
    count: u64,
    /// The first message's most bytes: the segment size (`usize::MAX` where not merged).
    size: usize,
}

#[inline(always)]
fn merged_segments(ctx: &TcContext, datagram: &Datagram) -> Merged {
    let whole = Merged {
        count: 1,
        size: usize::MAX,
    };
    // SAFETY: the context pointer the kernel passed; tc programs may read these fields.
    let size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    // Most packets are no GSO packet: their segment count is not read.
    if size == 0 || datagram.fragmented {
        return whole;
    }
    // SAFETY: as above.
    if unsafe { (*ctx.skb.skb).gso_segs } < 2 {
        return whole;
    }
    // From the payload, which the kernel's merge and split both follow, not the packet's word
    // for it.
    let payload = datagram.available.saturating_sub(UDP_HLEN);
    Merged {
        count: payload.div_ceil(size) as u64,
        size,
    }
}

/// A link-layer header of `L2` bytes → IPv4/IPv6 (extension headers walked) → UDP. `None`
/// for anything else: not ours to count, but for TCP behind extension headers and a chain of
/// them past the walk's reach (unparsed), an IP version that is not the skb's and an IPv4
/// header too short to hold its ports (malformed), counted on the way. An IP header
/// outside the linear part is pulled in with the UDP header after it (IPv6: when no
/// extension header comes between).
#[inline(always)]
fn locate<const L2: usize>(ctx: &TcContext) -> Option<Datagram> {
    let skb_len = ctx.len() as usize;
    match ether_type(ctx) {
        ETH_P_IP => {
            let header = or_pulled::<L2, _>(ctx, UDP_HLEN, fixed_header::<L2, IPV4_HLEN>)?;
            if header[9] != IPPROTO_UDP || wrong_ip_version(header[0], 4) {
                return None;
            }
            let ihl = usize::from(header[0] & 0x0f) * 4;
            // Its ports cannot be read; a receiving stack drops it (`ip_rcv_core`).
            if ihl < IPV4_HLEN {
                count_error(error_kind::PACKET_MALFORMED);
                return None;
            }
            let fragment = be16_at(&header, 6);
            // Later fragments carry no UDP header.
            if fragment & 0x1fff != 0 {
                return None;
            }
            let total = usize::from(be16_at(&header, 2));
            Some(Datagram {
                l4: L2 + ihl,
                available: within(L2 + total, skb_len).saturating_sub(L2 + ihl),
                fragmented: fragment & 0x2000 != 0,
                ipv6: false,
            })
        }
        ETH_P_IPV6 => {
            let header = or_pulled::<L2, _>(ctx, UDP_HLEN, fixed_header::<L2, IPV6_HLEN>)?;
            if wrong_ip_version(header[0], 6) {
                return None;
            }
            let payload = usize::from(be16_at(&header, 4));
            // TCP comes here only behind extension headers (`may_carry_tcp`): the walk
            // counts it unparsed.
            let upper = ipv6_upper_layer::<L2>(ctx, header[6])?;
            if upper.protocol != IPPROTO_UDP {
                return None;
            }
            Some(Datagram {
                l4: upper.offset,
                available: within(L2 + IPV6_HLEN + payload, skb_len).saturating_sub(upper.offset),
                fragmented: upper.more_fragments,
                ipv6: true,
            })
        }
        _ => None,
    }
}

/// Where the IP length says the packet ends, or 0 (no datagram: malformed, its length bad)
/// past the frame's end: a lie the stack drops the packet for (`ip_rcv_core`,
/// `ip6_rcv_core`), so no message reaches a socket. (Ethernet padding may follow the end.)
#[inline(always)]
fn within(ip_end: usize, skb_len: usize) -> usize {
    if ip_end > skb_len { 0 } else { ip_end }
}

/// Parses and counts one message; `Err` carries the malformed reason.
#[inline(always)]
fn count_message<const L2: usize>(
    ctx: &TcContext,
    datagram: &Datagram,
    segment_size: usize,
    role: Role,
    counters: &mut DnsCounters,
) -> Result<(), u32> {
    if datagram.available < UDP_HLEN {
        return Err(dns_malformed::BAD_LENGTH);
    }
    // Pulled in where the linear part ends after the ports (a valid message was counted
    // truncated).
    let [len_high, len_low, sum_high, sum_low] =
        ptr_at_or_pulled::<[u8; 4]>(ctx, datagram.l4 + 4, datagram.l4 + UDP_HLEN)
            // SAFETY: ptr_at checked the four bytes.
            .map(|fields| unsafe { *fields })
            .ok_or(dns_malformed::TRUNCATED)?;
    let udp_len = usize::from(u16::from_be_bytes([len_high, len_low]));
    if udp_len < UDP_HLEN || (!datagram.fragmented && udp_len > datagram.available) {
        return Err(dns_malformed::BAD_LENGTH);
    }
    // A UDP checksum is mandatory over IPv6 (RFC 8200): a receiving socket drops a zero one
    // unless it asked for them (tunnels do; DNS servers do not).
    if datagram.ipv6 && sum_high == 0 && sum_low == 0 {
        return Err(dns_malformed::BAD_CHECKSUM);
    }
    // What the receiving socket gets (for a first fragment: what this packet holds of it; of
    // merged datagrams, the first).
    let message_len = (udp_len.min(datagram.available) - UDP_HLEN).min(segment_size);
    if message_len < DNS_HLEN {
        return Err(dns_malformed::TRUNCATED);
    }
    let scratch = DNS_SCRATCH.get_ptr_mut(0).ok_or(dns_malformed::TRUNCATED)?;
    // SAFETY: this CPU's scratch value, used only within this run.
    let buf = unsafe { &mut (*scratch).bytes };
    let copy = (UDP_HLEN + message_len).min(DNS_COPY_BYTES);
    // The message ends here, in scratch coordinates, as far as it is copied: the first
    // question fits in the copy if it fits in the message, and past the copy lie the parked
    // values and the last packet's bytes (an uncapped end of a message over 475 bytes
    // wrapped at the scratch mask and cut the question off).
    let end = DNS_AT + (copy - UDP_HLEN);
    // Park what differs between the paths that lead here in the scratch value, where the
    // verifier does not follow it: the copy and the name walk below are then checked once,
    // not once per path (which ran past its million-instruction limit).
    park(buf, PARK_END, end as u64);
    park(buf, PARK_L4, datagram.l4 as u64);
    park(buf, PARK_ROLE, role as u64);
    park(buf, PARK_IPV6, u64::from(datagram.ipv6));
    copy_message(ctx, buf)?;
    let walked = question(buf);
    let role = match unpark(buf, PARK_ROLE) {
        0 => Role::Query,
        1 => Role::Response,
        2 => Role::Upstream,
        _ => Role::Relayed,
    };
    let at = Located {
        l4: unpark(buf, PARK_L4) as usize & (MAX_L4_OFFSET * 2 - 1),
        ipv6: unpark(buf, PARK_IPV6) != 0,
    };
    let id = be16(buf, DNS_AT);
    let flags = buf[DNS_AT + 2];
    let rcode_byte = buf[DNS_AT + 3];
    let question_count = be16(buf, DNS_AT + 4);
    let is_response = flags & 0x80 != 0;

    match role {
        Role::Query => {
            if is_response {
                return Err(dns_malformed::WRONG_DIRECTION);
            }
            if question_count == 0 {
                return Err(dns_malformed::NO_QUESTION);
            }
            let question = walked.valid()?;
            // The name is counted (in its slot, or in the event that claims it) before the
            // query is, so that a snapshot's top domains cover every query its counters show.
            on_query::<L2>(ctx, &at, id, &question, buf, counters);
            counters.queries_by_qtype[dns_qtype_index(question.qtype) as usize & 511] += 1;
            counters.queries_by_opcode[usize::from((flags >> 3) & 0x0f)] += 1;
            if let Some(class) = counters
                .queries_by_qclass
                .get_mut(dns_qclass_index(question.qclass) as usize)
            {
                *class += 1;
            }
        }
        Role::Response | Role::Relayed => {
            if !is_response {
                return Err(dns_malformed::WRONG_DIRECTION);
            }
            // A response may carry no question (some FORMERR answers); then there is no
            // name for the cache inference, and no QTYPE for the answer event.
            let asked = if question_count == 0 {
                None
            } else {
                let question = walked.valid()?;
                Some(question)
            };
            let rcode =
                u16::from(opt_rcode_high(buf, asked.as_ref())) << 4 | u16::from(rcode_byte & 0x0f);
            counters.responses_by_rcode[dns_rcode_index(rcode) as usize & 31] += 1;
            let truncated = flags & 0x02 != 0;
            if truncated {
                counters.responses_truncated += 1;
            }
            if matching() {
                on_response::<L2>(
                    ctx,
                    &at,
                    id,
                    rcode,
                    truncated,
                    asked.as_ref(),
                    role == Role::Response,
                    buf,
                    counters,
                );
            }
        }
        Role::Upstream => {
            // Only standard queries (opcode 0, one question) on their way out mean a miss;
            // answers to other hosts' queries to a local port 53 are not ours, nor are
            // other programs' datagrams that happen to parse.
            if is_response || question_count != 1 || (flags >> 3) & 0x0f != 0 {
                return Ok(());
            }
            let question = walked.valid()?;
            counters.upstream_queries += 1;
            if !matching() {
                return Ok(());
            }
            let now = ktime_ns();
            if let Some(stamp) = DNS_UPSTREAM.get_ptr_mut(upstream_slot(buf, &question)) {
                // SAFETY: an 8-byte-aligned value of our array; a torn read elsewhere is
                // impossible for an aligned u64.
                unsafe { core::ptr::write_volatile(stamp, now) };
            }
            // After the name's stamp, in the same CPU's order: the time stays at or above
            // every stamp.
            raise_upstream_latest(now);
        }
    }
    Ok(())
}

/// Copies the message, from its UDP header to the parked end, to scratch at [`COPY_AT`]: from
/// the linear part where it lies there, else with `bpf_skb_load_bytes`, which reads pages too.
#[inline(always)]
fn copy_message(ctx: &TcContext, buf: &mut [u8; DNS_SCRATCH_BYTES]) -> Result<(), u32> {
    let from = unpark(buf, PARK_L4) as usize & (MAX_L4_OFFSET * 2 - 1);
    // Never out of range (`count_message` parked it so); bounded again for the verifier, by a
    // clamp on the value itself: a range check, which the compiler makes one of `len - 20`,
    // bounds `len` only for a verifier that tracks a register as another plus a constant
    // (recent kernels), and the copy's offsets and size follow from `len`.
    let len = (unpark(buf, PARK_END) as usize)
        .wrapping_sub(COPY_AT)
        .min(DNS_COPY_BYTES);
    if len < UDP_HLEN + DNS_HLEN {
        return Err(dns_malformed::TRUNCATED);
    }
    if copy_linear(ctx, from, buf, len) {
        return Ok(());
    }
    // SAFETY: `len` is between 20 and DNS_COPY_BYTES, so COPY_AT + len stays inside the
    // 512-byte scratch value; the helper checks the packet side and fails rather than read
    // past the end.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            from as u32,
            buf[COPY_AT..].as_mut_ptr().cast(),
            len as u32,
        )
    };
    if loaded != 0 {
        return Err(dns_malformed::TRUNCATED);
    }
    Ok(())
}

/// Words in the longest copy of a message ([`DNS_COPY_BYTES`]).
const COPY_WORDS: usize = DNS_COPY_BYTES.div_ceil(8);

/// Copies the `len` bytes (at least a word, at most [`DNS_COPY_BYTES`]) at packet offset
/// `from` to scratch at [`COPY_AT`] straight from the linear part, a word at a time, the last
/// word ending at `len` (over part of the one before): `false` where they do not all lie
/// there, for `bpf_skb_load_bytes` to copy instead. That helper returns through two more
/// functions, and on a kernel that returns through a thunk (AMD's SRSO mitigation, "Safe
/// RET") those returns cost more than this copy of a query does (docs/DESIGN.md, Measuring
/// the cost).
#[inline(always)]
fn copy_linear(
    ctx: &TcContext,
    from: usize,
    buf: &mut [u8; DNS_SCRATCH_BYTES],
    len: usize,
) -> bool {
    let last = len - 8;
    for word in 0..COPY_WORDS {
        let at = (word * 8).min(last);
        let Some(source) = ptr_at::<u64>(ctx, from + at) else {
            return false;
        };
        // SAFETY: ptr_at checked the eight bytes; at + 8 <= len <= DNS_COPY_BYTES keeps the
        // store inside scratch, before the parked values.
        unsafe {
            copy_word(source.cast(), buf.as_mut_ptr().add(COPY_AT + at));
        }
        if at == last {
            return true;
        }
    }
    // Not reached for any `len` the caller allows: COPY_WORDS words reach DNS_COPY_BYTES.
    false
}

/// Copies the eight bytes at `from` to `to`, either unaligned, in one load and one store: the
/// kernel takes unaligned packet and map value accesses where the CPU does (x86-64, arm64),
/// and `read_unaligned` would be eight byte loads, and as many stores, shifts and spills.
///
/// # Safety
/// `from` must be readable and `to` writable for eight bytes, each checked for the verifier.
#[inline(always)]
unsafe fn copy_word(from: *const u8, to: *mut u8) {
    // SAFETY: the caller's; the instructions touch those sixteen bytes and no register but
    // the scratch one.
    unsafe {
        core::arch::asm!(
            "{word} = *(u64 *)({from} + 0)",
            "*(u64 *)({to} + 0) = {word}",
            from = in(reg) from,
            to = in(reg) to,
            word = out(reg) _,
            options(nostack, preserves_flags),
        );
    }
}

#[inline(always)]
fn be16(buf: &[u8; DNS_SCRATCH_BYTES], at: usize) -> u16 {
    u16::from_be_bytes([buf[at & MASK], buf[(at + 1) & MASK]])
}

/// The RCODE's upper eight bits, from the TTL of an EDNS OPT record (RFC 6891, 6.1.3) right
/// after the first question (or the header, without one), where that record is the message's
/// one record: how servers send BADVERS (RFC 6891) and BADCOOKIE (RFC 7873). 0 otherwise: an
/// OPT record behind answers is not looked for, as the walk over them would cost every
/// response.
#[inline(always)]
fn opt_rcode_high(buf: &[u8; DNS_SCRATCH_BYTES], asked: Option<&Question>) -> u8 {
    // QDCOUNT, ANCOUNT, NSCOUNT and ARCOUNT as one word, as they lie in the message.
    const ONE_QUESTION: u64 = u64::from_ne_bytes([0, 1, 0, 0, 0, 0, 0, 1]);
    const NO_QUESTION: u64 = u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1]);
    // SAFETY: an 8-aligned u64 inside the scratch value (DNS_AT + 4 is 40).
    let counts = unsafe { buf.as_ptr().add(DNS_AT + 4).cast::<u64>().read() };
    let at = match asked {
        Some(question) if counts == ONE_QUESTION => NAME_AT + (question.name_len & 0xff) + 4,
        None if counts == NO_QUESTION => NAME_AT,
        _ => return 0,
    };
    // The record's fixed part must lie in the copy (past it: the last packet's bytes); its
    // name is the root, its TYPE 41 (OPT).
    if at + DNS_OPT_FIXED_BYTES > unpark(buf, PARK_END) as usize
        || buf[at & MASK] != 0
        || be16(buf, at + 1) != 41
    {
        return 0;
    }
    buf[(at + 5) & MASK]
}

/// Scratch offsets past the copied message, where [`park`] keeps values (8-aligned).
const PARK_END: usize = 448;
const PARK_L4: usize = 456;
const PARK_ROLE: usize = 464;
const PARK_IPV6: usize = 472;
const PARK_NAME_LEN: usize = 480;
const PARK_REASON: usize = 488;

#[inline(always)]
fn park(buf: &mut [u8; DNS_SCRATCH_BYTES], at: usize, value: u64) {
    // SAFETY: an 8-aligned u64 inside the scratch value (map values are 8-aligned), past
    // anything copied from the packet.
    unsafe { core::ptr::write_volatile(buf[at..at + 8].as_mut_ptr().cast::<u64>(), value) }
}

#[inline(always)]
fn unpark(buf: &[u8; DNS_SCRATCH_BYTES], at: usize) -> u64 {
    // SAFETY: as in `park`.
    unsafe { core::ptr::read_volatile(buf[at..at + 8].as_ptr().cast::<u64>()) }
}

/// Walks the first question's name (labels only: a compression pointer has no earlier name
/// to point to in the first question) and reads its QTYPE. The message end comes parked.
#[inline(always)]
fn question(buf: &mut [u8; DNS_SCRATCH_BYTES]) -> Question {
    let end = unpark(buf, PARK_END) as usize & MASK;
    let mut pos = NAME_AT;
    let mut outcome = Err(dns_malformed::BAD_NAME);
    // Each label takes at least two bytes, so 128 steps cover the longest name.
    for _ in 0..=DNS_NAME_MAX / 2 {
        if pos >= end {
            outcome = Err(dns_malformed::TRUNCATED);
            break;
        }
        let len = usize::from(buf[pos & MASK]);
        if len == 0 {
            outcome = Ok(pos - NAME_AT + 1);
            break;
        }
        if len & 0xc0 != 0 {
            break;
        }
        pos += len + 1;
        // The root label would land beyond the 255-byte limit.
        if pos - NAME_AT >= DNS_NAME_MAX {
            break;
        }
    }
    // Park the length too: each step the loop can end at leaves a different known range, and
    // the code after it would otherwise be checked once per step.
    park(buf, PARK_NAME_LEN, outcome.unwrap_or(0) as u64);
    let reason = match outcome {
        Ok(_) => 0,
        Err(reason) => reason,
    };
    park(buf, PARK_REASON, u64::from(reason));
    let name_len = unpark(buf, PARK_NAME_LEN) as usize & 0xff;
    if name_len == 0 {
        return Question::unreadable(unpark(buf, PARK_REASON) as u32);
    }
    // QTYPE and QCLASS follow the name.
    if NAME_AT + name_len + 4 > end {
        return Question::unreadable(dns_malformed::TRUNCATED);
    }
    Question {
        name_len,
        qtype: be16(buf, NAME_AT + name_len),
        qclass: be16(buf, NAME_AT + name_len + 2),
        malformed: 0,
    }
}

/// Case-insensitive hash of the name's wire form (ASCII letters folded), eight bytes at a
/// time, keyed with this start's random keys ([`dns_name_hash_word`]), with `qtype` mixed
/// in (0: the name alone). Its high half is the universal one: slots are chosen by it.
#[inline(always)]
fn name_hash(buf: &[u8; DNS_SCRATCH_BYTES], name_len: usize, qtype: u16) -> u64 {
    let Some(keys) = DNS_NAME_KEYS.get(0) else {
        return 0;
    };
    let mut hash = keys
        .seed
        .wrapping_add(keys.qtype.wrapping_mul(u64::from(qtype)));
    for word in 0..DNS_NAME_MAX.div_ceil(8) {
        let done = word * 8;
        if done >= name_len {
            break;
        }
        let at = NAME_AT + (word & 31) * 8;
        // One 8-byte load (a byte-wise copy took eight loads and fourteen shifts and ors).
        // SAFETY: an 8-aligned u64 inside the scratch value (`DnsScratch` is 8-aligned, and
        // so is NAME_AT); `at + 8` is at most NAME_AT + 256, inside the 512 bytes.
        // Little-endian, as the target is.
        let word_value = unsafe { buf.as_ptr().add(at).cast::<u64>().read() };
        let mut value = dns_lowercase_word(word_value);
        let left = name_len - done;
        if left < 8 {
            value &= (1u64 << (left * 8)) - 1;
        }
        hash = dns_name_hash_word(hash, keys, word, value);
    }
    hash
}

/// The client's address and port: the source of a query, the destination of a response.
#[inline(always)]
fn client<const L2: usize>(ctx: &TcContext, at: &Located, source: bool) -> Option<([u8; 16], u16)> {
    let mut addr = [0u8; 16];
    if at.ipv6 {
        let at = L2 + if source { 8 } else { 24 };
        let ptr = ptr_at::<[u8; 16]>(ctx, at)?;
        // SAFETY: ptr_at checked the 16 bytes.
        addr = unsafe { *ptr };
    } else {
        let at = L2 + if source { 12 } else { 16 };
        let ptr = ptr_at::<[u8; 4]>(ctx, at)?;
        addr[10] = 0xff;
        addr[11] = 0xff;
        // SAFETY: ptr_at checked the 4 bytes.
        addr[12..16].copy_from_slice(&unsafe { *ptr });
    }
    let port = read_be16(ctx, at.l4 + if source { 0 } else { 2 })?;
    Some((addr, port))
}

/// Matching responses to queries is on (`[dns] match_responses`).
#[inline(always)]
fn matching() -> bool {
    DNS_MATCH_RESPONSES.load() != 0
}

/// The query with this id from the client's `port` is in a sample: `hash` of port and id
/// below `below` (2^32: every query). The query and its response decide it from the same
/// hash: one outside the matched sample (`[dns] match_every`) costs no read of the client's
/// address, no clock read and no look-up, and an answer is streamed only for a query that
/// was sampled (`[dns] sample_every`).
#[inline(always)]
fn in_sample(port: Option<u16>, id: u16, below: u64, hash: impl Fn(u16, u16) -> u32) -> bool {
    below > u64::from(u32::MAX) || port.is_some_and(|port| u64::from(hash(port, id)) < below)
}

/// The client's port (the source of a query, the destination of a response), read only
/// where a sample needs it: with every query in both samples (the default), not at all.
#[inline(always)]
fn sample_port(ctx: &TcContext, at: &Located, query: bool) -> Option<u16> {
    let every = u64::from(u32::MAX);
    if DNS_SAMPLE_BELOW.load() > every && DNS_MATCH_BELOW.load() > every {
        return None;
    }
    read_be16(ctx, at.l4 + if query { 0 } else { 2 })
}

/// Remembers the query for its response, and samples its name: counted in the name table,
/// and while someone reads the event stream also sent to the ring whole, for the stream
/// only (a full ring then loses a stream line; a name that holds its slot counts on, one
/// that must claim a slot still needs its name event through the ring).
#[inline(always)]
fn on_query<const L2: usize>(
    ctx: &TcContext,
    at: &Located,
    id: u16,
    question: &Question,
    buf: &mut [u8; DNS_SCRATCH_BYTES],
    counters: &mut DnsCounters,
) {
    let port = sample_port(ctx, at, true);
    let sample = in_sample(port, id, DNS_SAMPLE_BELOW.load(), dns_name_sample);
    let streamed = sample && stream_wanted();
    if sample {
        count_name(question, buf, counters);
    }
    let matched = matching() && in_sample(port, id, DNS_MATCH_BELOW.load(), dns_match_sample);
    if !matched {
        counters.queries_unmatched += 1;
        if !streamed {
            return;
        }
    }
    let Some((addr, port)) = client::<L2>(ctx, at, true) else {
        return;
    };
    // Without matching the time only stamps the streamed event, where the last tick is
    // precise enough: reading the clock source costs about 40 ns here (docs/DESIGN.md, DNS).
    let now = if matched {
        ktime_ns()
    } else {
        coarse_ktime_ns()
    };
    if matched {
        let tag = question_tag(buf, question);
        remember(
            &addr,
            port,
            id,
            (now & !DNS_QUESTION_TAG_MASK) | tag,
            counters,
        );
    }
    if streamed {
        sample_query(id, question, addr, port, now, buf, counters);
    }
}

/// Someone reads the event stream (the agent flips the switch).
#[inline(always)]
fn stream_wanted() -> bool {
    DNS_STREAM_WANTED.get(0).is_some_and(|&wanted| wanted != 0)
}

/// Counts the query's name in this CPU's slot for it. A name new to the slot goes to the
/// agent once, with the final count of the name it replaces; while it keeps the slot its
/// queries cost an increment, not a ring record each (docs/DESIGN.md, DNS).
#[inline(always)]
fn count_name(question: &Question, buf: &mut [u8; DNS_SCRATCH_BYTES], counters: &mut DnsCounters) {
    let name_len = question.name_len & 0xff;
    let hash = name_hash(buf, name_len, 0);
    match tally(&DNS_NAMES, &hash, (hash >> 32) as u32) {
        Tally::Counted => {}
        // A CPU beyond the table the agent sized: the sample is lost, and said so.
        Tally::NoSlot => {
            // The name counter first, as in `send_with_name`.
            count_error(error_kind::DNS_NAME_DROPPED);
            counters.events_dropped += 1;
        }
        Tally::Claim(claim) => {
            let event = DnsNameEvent {
                kind: DNS_EVENT_NAME,
                slot: claim.index,
                replaced_count: claim.replaced_count,
                tenure: claim.tenure,
                name_len: name_len as u16,
                _pad: 0,
            };
            // A full ring leaves the slot to its name, whose count the agent can still read.
            if send_with_name(event, buf, name_len, counters, true) {
                claim.take(&hash);
            }
        }
    }
}

/// A tag of the question for the in-flight slot: the name's first eight bytes with A to Z
/// folded (a response echoes the question, but a retry may change its 0x20 case), its
/// length and its QTYPE, folded into [`DNS_QUESTION_TAG_MASK`]'s bits. One load and a
/// multiply: hashing the whole name again for every response would cost what the name
/// table's hash does.
#[inline(always)]
fn question_tag(buf: &[u8; DNS_SCRATCH_BYTES], question: &Question) -> u64 {
    // SAFETY: as in `name_hash`: an 8-aligned u64 at NAME_AT, inside the scratch value.
    let first = dns_lowercase_word(unsafe { buf.as_ptr().add(NAME_AT).cast::<u64>().read() });
    let name_len = question.name_len & 0xff;
    // Past a short name lie its QTYPE, its QCLASS and the next section, which a response's
    // differs in.
    let first = if name_len < 8 {
        first & ((1u64 << (name_len * 8)) - 1)
    } else {
        first
    };
    let mixed = first ^ ((name_len as u64) << 48) ^ (u64::from(question.qtype) << 32);
    mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56 & DNS_QUESTION_TAG_MASK
}

/// Takes a free slot of the query's in-flight set (a retransmission, the same client, port,
/// id and question's tag, keeps the first one's; the same id for another question is
/// another query). A slot whose query waited past the timeout is given up (unanswered) and
/// free again. With every slot held by a query still waiting, this one goes untracked: the
/// waiting ones are not thrown out, since the slowest answers would then be the ones lost.
/// `now` carries the question's tag.
#[inline(always)]
fn remember(addr: &[u8; 16], port: u16, id: u16, now: u64, counters: &mut DnsCounters) {
    let client = client_fingerprint(addr);
    let set = dns_inflight_set(client, port, id, DNS_INFLIGHT_BITS.load());
    let mut free = None;
    for way in 0..DNS_INFLIGHT_WAYS {
        let Some(slot) = DNS_INFLIGHT.get_ptr_mut(set + way) else {
            return;
        };
        // SAFETY: a value of our array map. Two CPUs writing one slot at once can tear it; the
        // response then fails to match and is counted as unmatched.
        let slot = unsafe { &mut *slot };
        if slot.start_ns == 0 {
            free = free.or(Some(slot));
            continue;
        }
        let given_up = dns_query_given_up(now, slot.start_ns);
        if slot.client == client
            && slot.client_port == port
            && slot.id == id
            && (slot.start_ns ^ now) & DNS_QUESTION_TAG_MASK == 0
        {
            if given_up {
                // The same query after the timeout: a new one, and the first one went
                // unanswered.
                counters.unanswered_queries += 1;
                *slot = in_flight(client, port, id, now);
            } else {
                // A retransmission: keep the first time, which is what the client waits from.
                counters.duplicate_queries += 1;
            }
            return;
        }
        if given_up {
            counters.unanswered_queries += 1;
            slot.start_ns = 0;
            free = free.or(Some(slot));
        }
    }
    match free {
        Some(slot) => *slot = in_flight(client, port, id, now),
        None => counters.untracked_queries += 1,
    }
}

#[inline(always)]
const fn in_flight(client: u32, client_port: u16, id: u16, start_ns: u64) -> DnsInFlight {
    DnsInFlight {
        start_ns,
        client,
        client_port,
        id,
    }
}

/// Sends the query, with its name, to the ring for the event stream.
#[inline(always)]
fn sample_query(
    id: u16,
    question: &Question,
    client_addr: [u8; 16],
    client_port: u16,
    now: u64,
    buf: &mut [u8; DNS_SCRATCH_BYTES],
    counters: &mut DnsCounters,
) {
    let name_len = question.name_len & 0xff;
    let event = DnsQueryEvent {
        kind: DNS_EVENT_QUERY,
        qtype: question.qtype,
        client_port,
        timestamp_ns: now,
        client_addr,
        id,
        name_len: name_len as u16,
        _pad: 0,
    };
    send_with_name(event, buf, name_len, counters, false);
}

/// Sends `event` and the question's name as one ring record: the event is written into
/// scratch right before the name, over headers already read, and both go out in one copy.
/// `false` if the ring had no room (counted as dropped; `name_event`: as a name event too,
/// counted first, so that the agent, which reads the DNS counters first, never reads a
/// name event in `events_dropped` without it in `DNS_NAME_DROPPED`).
#[inline(always)]
fn send_with_name<E>(
    event: E,
    buf: &mut [u8; DNS_SCRATCH_BYTES],
    name_len: usize,
    counters: &mut DnsCounters,
    name_event: bool,
) -> bool {
    let at = const {
        let at = NAME_AT - size_of::<E>();
        assert!(at.is_multiple_of(8));
        at
    };
    // SAFETY: `at` is 8-aligned inside the scratch value (which is 8-aligned), and the event
    // ends at NAME_AT.
    unsafe { core::ptr::write(buf[at..NAME_AT].as_mut_ptr().cast(), event) };
    let Some(record) = buf.get(at..NAME_AT + (name_len & 0xff)) else {
        return false;
    };
    if DNS_EVENTS
        .output_untyped::<[u8]>(record, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        if name_event {
            count_error(error_kind::DNS_NAME_DROPPED);
        }
        counters.events_dropped += 1;
        return false;
    }
    true
}

/// Matches the response to its query: latency, cache hit or miss (neither unless `judged`:
/// a relayed response's server asks its upstreams where this namespace does not see; nor
/// for a response without a question), the answer event. An answer to a query already
/// given up is unmatched.
#[expect(
    clippy::too_many_arguments,
    reason = "inlined into the classifier: a struct would only be unpacked again"
)]
#[inline(always)]
fn on_response<const L2: usize>(
    ctx: &TcContext,
    at: &Located,
    id: u16,
    rcode: u16,
    truncated: bool,
    asked: Option<&Question>,
    judged: bool,
    buf: &[u8; DNS_SCRATCH_BYTES],
    counters: &mut DnsCounters,
) {
    let port = sample_port(ctx, at, false);
    if !in_sample(port, id, DNS_MATCH_BELOW.load(), dns_match_sample) {
        return;
    }
    let Some((addr, port)) = client::<L2>(ctx, at, false) else {
        counters.unmatched_responses += 1;
        return;
    };
    // A response without a question (some FORMERR answers) matches on the flow alone.
    let tag = asked.map(|question| question_tag(buf, question));
    let Some(slot) = waiting(client_fingerprint(&addr), port, id, tag) else {
        counters.unmatched_responses += 1;
        return;
    };
    let started = slot.start_ns & !DNS_QUESTION_TAG_MASK;
    slot.start_ns = 0;
    let now = ktime_ns();
    // Past the timeout the query was given up, whether or not another query of its set has
    // taken the slot back yet: a late answer comes out the same either way, unanswered and
    // unmatched, and never as an answer of that latency.
    if dns_query_given_up(now, started) {
        counters.unanswered_queries += 1;
        counters.unmatched_responses += 1;
        return;
    }
    let latency = now.wrapping_sub(started);
    counters.answered += 1;
    counters.latency[duration_bucket::<DURATION_BUCKETS>(latency) as usize & 31] += 1;
    counters.latency_ns += latency;
    // A response without a question (some FORMERR answers) names nothing to have been asked
    // upstream: neither a hit nor a miss, as a relayed one.
    let judged = judged && asked.is_some();
    // Most answers come while nothing has gone upstream since their query arrived: those are
    // hits without hashing the name or reading its stamp (a cold line).
    let miss = judged
        && asked.is_some_and(|question| {
            upstream_since(started)
                && DNS_UPSTREAM
                    .get_ptr_mut(upstream_slot(buf, question))
                    .is_some_and(|stamp| {
                        // SAFETY: as in `count_message`.
                        (unsafe { core::ptr::read_volatile(stamp) }) >= started
                    })
        });
    if !judged {
        counters.cache_undecided += 1;
    } else if miss {
        counters.cache_misses += 1;
    } else {
        counters.cache_hits += 1;
    }
    // Answer events feed only the event stream: none while nobody reads it, nor for a query
    // that was not streamed.
    if !stream_wanted() || !in_sample(Some(port), id, DNS_SAMPLE_BELOW.load(), dns_name_sample) {
        return;
    }
    let event = DnsAnswerEvent {
        kind: DNS_EVENT_ANSWER,
        rcode: (rcode & 0x0f) as u8,
        cache_miss: if judged {
            u8::from(miss)
        } else {
            DNS_CACHE_UNDECIDED
        },
        truncated: u8::from(truncated),
        rcode_high: (rcode >> 4) as u8,
        latency_ns: latency,
        timestamp_ns: now,
        client_addr: addr,
        client_port: port,
        id,
        qtype: asked.map_or(0, |question| question.qtype),
        _pad2: 0,
    };
    if DNS_EVENTS
        .output_untyped::<DnsAnswerEvent>(&event, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        counters.events_dropped += 1;
    }
}

/// The in-flight slot of the query a response answers, if it is waiting: its flow, and its
/// question's `tag` where the response has a question.
#[inline(always)]
fn waiting(client: u32, port: u16, id: u16, tag: Option<u64>) -> Option<&'static mut DnsInFlight> {
    let set = dns_inflight_set(client, port, id, DNS_INFLIGHT_BITS.load());
    for way in 0..DNS_INFLIGHT_WAYS {
        let slot = DNS_INFLIGHT.get_ptr_mut(set + way)?;
        // SAFETY: as in `remember`.
        let slot = unsafe { &mut *slot };
        if slot.start_ns != 0
            && slot.client == client
            && slot.client_port == port
            && slot.id == id
            && tag.is_none_or(|tag| slot.start_ns & DNS_QUESTION_TAG_MASK == tag)
        {
            return Some(slot);
        }
    }
    None
}

/// The slot of `DNS_UPSTREAM` for the question: its name and its QTYPE, since an upstream
/// query for a name's AAAA says nothing of whether its A came from the cache.
#[inline(always)]
fn upstream_slot(buf: &[u8; DNS_SCRATCH_BYTES], question: &Question) -> u32 {
    ((name_hash(buf, question.name_len, question.qtype) >> 32) as u32) & (DNS_UPSTREAM_SLOTS - 1)
}

/// Something, for any name, went upstream at or after `since`.
#[inline(always)]
fn upstream_since(since: u64) -> bool {
    DNS_UPSTREAM_LATEST
        .get(0)
        .is_some_and(|&latest| latest >= since)
}

/// Raises the time of the latest upstream query to `now`. A compare-and-swap, so that a CPU
/// that read the clock earlier cannot lower it; a failed one means another CPU raised it in
/// between, so running out of tries takes that many CPUs sending upstream queries at once.
#[inline(always)]
fn raise_upstream_latest(now: u64) {
    let Some(latest) = DNS_UPSTREAM_LATEST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: an 8-byte-aligned value of our array, valid for the program's run.
    let mut seen = unsafe { core::ptr::read_volatile(latest) };
    for _ in 0..UPSTREAM_LATEST_TRIES {
        if seen >= now {
            return;
        }
        // SAFETY: as above.
        let (found, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::AcqRel }, { AtomicOrdering::Relaxed }>(
                latest, seen, now,
            )
        };
        if swapped {
            return;
        }
        seen = found;
    }
}

#[inline(always)]
fn ktime_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// `CLOCK_MONOTONIC` as of the last tick: no clock source read.
#[inline(always)]
fn coarse_ktime_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

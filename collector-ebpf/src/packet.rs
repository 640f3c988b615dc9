//! Bounds-checked reads from a packet's linear data: every direct packet read of the
//! classifiers goes through [`ptr_at`].
//!
//! Headers are not always linear: drivers that build received packets from pages
//! (`napi_gro_frags`: gve, sfc, mlx4, tun with `IFF_NAPI_FRAGS`) leave only the Ethernet
//! header there when GRO is off, and tc ingress runs before IP pulls its header in. Where a
//! first read of a header fails, the parsers pull the headers in ([`pull`]) and read again:
//! the pull is on that branch only, so linear headers cost nothing more.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, sk_buff::SkBuff};
use collector_common::{LOCAL_ADDRESS_WAYS, address_words, error_kind, local_address_sets};

use crate::{
    LOCAL_ADDRESS_SET_BITS, LOCAL_ADDRESSES, LOCAL_ADDRESSES_COMPLETE, LOCAL_ONLY,
    REDIRECT_DEVICES, count_error,
};

/// The link-layer header before the IP header (`L2` in the parsers) on Ethernet and loopback.
pub const ETH_HLEN: usize = 14;
/// `L2` on an interface whose packets start at the IP header (WireGuard, tun).
pub const NO_LINK_HEADER: usize = 0;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV6_HLEN: usize = 40;
/// IPv4's fixed header, without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 hop-by-hop options header.
pub const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv6 extension headers walked before giving up on finding the upper layer.
const MAX_EXT_HEADERS: usize = 6;
/// Upper bound for the upper layer's offset, so that offsets stay small for the verifier.
pub const MAX_L4_OFFSET: usize = 512;

/// Bounds-checked pointer to a `T` at `offset` in the packet's linear data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > linear_end(&ctx.skb) {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The end of the packet's linear data, loaded anew for each check, right beside it: kept
/// from an earlier one, LLVM may copy it with a 32-bit move or compare it in 32 bits, after
/// which the verifier no longer takes it for the packet's end and refuses the read it guards
/// ("invalid access to packet").
#[inline(always)]
pub fn linear_end(skb: &SkBuff) -> usize {
    // SAFETY: a context field the kernel passed; the verifier rewrites the load.
    unsafe { core::ptr::read_volatile(&raw const (*skb.skb).data_end) as usize }
}

/// The IP header's fixed part (`FIXED` bytes: IPv4's 20, IPv6's 40) where it is whole in the
/// linear part; `None` otherwise, for [`or_pulled`] to pull it in. One bounds check for every
/// field the parsers read from it, copied out (only the bytes read are loaded), so that no
/// reference into the packet outlives a later pull. (Where the first read took one byte, a
/// linear part that ended inside the header failed the reads after it, and the packet went
/// uncounted and unsaid.)
#[inline(always)]
pub fn fixed_header<const L2: usize, const FIXED: usize>(ctx: &TcContext) -> Option<[u8; FIXED]> {
    // SAFETY: ptr_at checked the FIXED bytes.
    ptr_at::<[u8; FIXED]>(ctx, L2).map(|header| unsafe { *header })
}

/// The big-endian 16-bit field at `at` of a header read whole.
#[inline(always)]
pub fn be16_at<const N: usize>(header: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([header[at], header[at + 1]])
}

/// Makes the packet's first `len` bytes linear, as far as the packet has them, where its
/// linear part is shorter. `true` if something was pulled: read again then, through
/// [`ptr_at`] (the verifier forgets every packet pointer taken before a pull). A packet
/// really too short for a header still fails that read, and is counted as before.
#[inline(always)]
pub fn pull(ctx: &TcContext, len: usize) -> bool {
    let len = len.min(ctx.len() as usize);
    // Compared as `ptr_at` does: the verifier refuses to subtract packet pointers.
    ctx.data() + len > linear_end(&ctx.skb) && ctx.pull_data(len as u32).is_ok()
}

/// Pulls the link-layer and IP headers and the first `l4_bytes` after them: for the branch
/// where a read of the IP header failed. IPv4's header length is read with
/// `bpf_skb_load_bytes`, which reads pages too; IPv6 extension headers are not covered.
#[inline(always)]
pub fn pull_headers<const L2: usize>(ctx: &TcContext, l4_bytes: usize) -> bool {
    let ip_header = if ether_type(ctx) == ETH_P_IP {
        match ctx.load::<u8>(L2) {
            // At least the fixed header, which the first read takes whole: one that claims
            // less is then read, and counted malformed, not truncated.
            Ok(version_ihl) => (usize::from(version_ihl & 0x0f) * 4).max(IPV4_HLEN),
            Err(_) => return false,
        }
    } else {
        IPV6_HLEN
    };
    pull(ctx, L2 + ip_header + l4_bytes)
}

/// `read` of the IP header, and where it fails, `read` again after [`pull_headers`].
#[inline(always)]
pub fn or_pulled<const L2: usize, R>(
    ctx: &TcContext,
    l4_bytes: usize,
    read: impl Fn(&TcContext) -> Option<R>,
) -> Option<R> {
    read(ctx).or_else(|| {
        if pull_headers::<L2>(ctx, l4_bytes) {
            read(ctx)
        } else {
            None
        }
    })
}

/// [`ptr_at`], and where it fails, again after pulling the packet's first `len` bytes.
#[inline(always)]
pub fn ptr_at_or_pulled<T>(ctx: &TcContext, offset: usize, len: usize) -> Option<*const T> {
    ptr_at(ctx, offset).or_else(|| {
        if pull(ctx, len) {
            ptr_at(ctx, offset)
        } else {
            None
        }
    })
}

#[inline(always)]
pub fn read_u8(ctx: &TcContext, offset: usize) -> Option<u8> {
    // SAFETY: ptr_at checked that the byte is inside the packet.
    ptr_at::<u8>(ctx, offset).map(|p| unsafe { *p })
}

#[inline(always)]
pub fn read_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    // SAFETY: ptr_at checked that both bytes are inside the packet; unaligned read.
    ptr_at::<[u8; 2]>(ctx, offset).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// The EtherType of the packet, from the skb (set by the stack for every packet tc sees).
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> u16 {
    // The skb keeps the protocol in network byte order in a u32 field.
    u16::from_be(ctx.skb.protocol() as u16)
}

/// Whether an Ethernet frame carries a VLAN tag in its bytes rather than in the skb's
/// metadata: a VLAN device with `reorder_hdr off` keeps it there, at ingress with the skb
/// saying IP (the IP header then 4 bytes past where the parsers read it) and at egress, on
/// it and its lower device, with the skb saying 802.1Q. Not parsed: a TCP one counts as
/// unparsed. Read for every Ethernet frame: two bytes of the line the IP header is in.
#[inline(always)]
pub fn tag_in_frame(ctx: &TcContext) -> bool {
    let Some(frame_type) = read_be16(ctx, ETH_HLEN - 2) else {
        return false;
    };
    if frame_type != ETH_P_8021Q && frame_type != ETH_P_8021AD {
        return false;
    }
    // SAFETY: a context field read, rewritten by the verifier.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        // A priority tag (VLAN 0) in the metadata, a real tag inside: the stack takes the
        // inner one into the metadata next and runs this hook again, and the VLAN device
        // counts the packet.
        return true;
    }
    let inner = ETH_HLEN + VLAN_HLEN;
    let tcp = match load_be16(ctx, inner - 2) {
        Some(ETH_P_IP) => load_u8(ctx, inner + 9) == Some(IPPROTO_TCP),
        Some(ETH_P_IPV6) => load_u8(ctx, inner + 6) == Some(IPPROTO_TCP),
        _ => false,
    };
    if tcp {
        count_error(error_kind::PACKET_UNPARSED);
    }
    true
}

/// Whether the packet is a GSO packet (segmented, or to be, by size): only such a packet may
/// carry a zero IP length, BIG TCP's mark of a packet over 64 KiB.
#[inline(always)]
pub fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer the kernel passed; tc programs may read `gso_size`.
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

/// Whether the IP header says TCP follows (IPv6: with no extension header between, or a
/// jumbo packet's hop-by-hop header, which the TCP counting looks into). Also true when that
/// byte cannot be read, so that the TCP counting sees the truncated header. Headers outside
/// the linear part are read with `bpf_skb_load_bytes`, and left for the parser to pull.
#[inline(always)]
pub fn may_carry_tcp<const L2: usize>(ctx: &TcContext) -> bool {
    match ether_type(ctx) {
        ETH_P_IP => load_u8(ctx, L2 + 9).is_none_or(|protocol| protocol == IPPROTO_TCP),
        ETH_P_IPV6 => load_u8(ctx, L2 + 6).is_none_or(|next| {
            next == IPPROTO_TCP || (next == NEXTHDR_HOP && load_be16(ctx, L2 + 4) == Some(0))
        }),
        _ => false,
    }
}

/// What follows an IPv6 packet's extension headers.
pub struct Ipv6Upper {
    /// The upper-layer protocol: the last next-header field walked.
    pub protocol: u8,
    /// Offset of its header in the packet.
    pub offset: usize,
    /// A fragment header said more fragments follow: this is the first fragment.
    pub more_fragments: bool,
}

/// Walks the extension headers of an IPv6 packet whose fixed header names `next`, not TCP
/// (the fixed header read; TCP there is the caller's, and would be counted unparsed here).
/// Headers outside the linear part are read with `bpf_skb_load_bytes`, which reads pages
/// too. `None` where a header cannot be read (the
/// stack drops such a packet) and for a fragment after the first (its upper layer's header
/// is in the first); and counted unparsed, where TCP follows the chain (the live counters
/// do not read past extension headers, nor find a later fragment's segment), and where the
/// chain runs past [`MAX_EXT_HEADERS`] or [`MAX_L4_OFFSET`], whatever it carries (a stack
/// reads on, so a query or a segment hidden behind a long chain is seen to be missed).
#[inline(always)]
pub fn ipv6_upper_layer<const L2: usize>(ctx: &TcContext, mut next: u8) -> Option<Ipv6Upper> {
    let mut offset = L2 + IPV6_HLEN;
    let mut more_fragments = false;
    let mut later_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        if !is_extension_header(next) {
            break;
        }
        // Next header, length and (fragment header) offset and flags in one read: the
        // verifier loses the bounds of separate reads at a variable offset.
        let [next_header, len, offset_high, offset_low] = match ptr_at::<[u8; 4]>(ctx, offset) {
            // SAFETY: ptr_at checked the four bytes.
            Some(ptr) => unsafe { *ptr },
            None => ctx.load::<[u8; 4]>(offset).ok()?,
        };
        match next {
            NEXTHDR_FRAGMENT => {
                let offset_flags = u16::from_be_bytes([offset_high, offset_low]);
                more_fragments = offset_flags & 1 != 0;
                if offset_flags & 0xfff8 != 0 {
                    later_fragment = true;
                    next = next_header;
                    break;
                }
                offset += 8;
            }
            NEXTHDR_AUTH => offset += (usize::from(len) + 2) * 4,
            _ => offset += (usize::from(len) + 1) * 8,
        }
        next = next_header;
        if offset > MAX_L4_OFFSET {
            break;
        }
    }
    // Counted once, out of the unrolled loop.
    if next == IPPROTO_TCP
        || (!later_fragment && (offset > MAX_L4_OFFSET || is_extension_header(next)))
    {
        count_error(error_kind::PACKET_UNPARSED);
        return None;
    }
    if later_fragment {
        return None;
    }
    Some(Ipv6Upper {
        protocol: next,
        offset,
        more_fragments,
    })
}

/// Whether the IP header's first byte says another version than the skb's protocol
/// (`version`): a receiving stack drops such a packet (`ip_rcv_core`, `ipv6_rcv`), so it is
/// counted malformed, and nothing else, whatever it carries.
#[inline(always)]
pub fn wrong_ip_version(first_byte: u8, version: u8) -> bool {
    let wrong = first_byte >> 4 != version;
    if wrong {
        count_error(error_kind::PACKET_MALFORMED);
    }
    wrong
}

/// The extension headers [`ipv6_upper_layer`] walks.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

/// [`read_u8`], or where the byte is outside the linear part, `bpf_skb_load_bytes`.
#[inline(always)]
fn load_u8(ctx: &TcContext, offset: usize) -> Option<u8> {
    read_u8(ctx, offset).or_else(|| ctx.load(offset).ok())
}

/// [`read_be16`], or where the bytes are outside the linear part, `bpf_skb_load_bytes`.
#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    read_be16(ctx, offset).or_else(|| ctx.load(offset).ok().map(u16::from_be_bytes))
}

/// A packet this namespace forwards rather than sends (it came in on an interface), while
/// only this namespace's traffic counts (`LOCAL_ONLY`). tc egress runs after source NAT,
/// so a masqueraded packet carries a local source address and only this tells it apart.
#[inline(always)]
pub fn forwarded(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer the kernel passed; tc programs may read `ingress_ifindex`
    // (the skb's `skb_iif`: 0 for a packet made here).
    LOCAL_ONLY.load() != 0 && unsafe { (*ctx.skb.skb).ingress_ifindex } != 0
}

/// A packet an ifb hands back to the device whose egress hook redirected it there (egress
/// shaping): its second pass through that hook, the first one counted. The ifb is then the
/// interface it came in on. Read only for packets the caller would count.
#[inline(always)]
pub fn handed_back_by_ifb(ctx: &TcContext) -> bool {
    // SAFETY: as in `forwarded`.
    let came_in_on = unsafe { (*ctx.skb.skb).ingress_ifindex };
    came_in_on != 0
        && REDIRECT_DEVICES
            .get(0)
            .is_some_and(|devices| devices.contains(&came_in_on))
}

/// Whether the packet is to (`inbound`) or from this namespace: its destination or source
/// address is in `LOCAL_ADDRESSES`; or `LOCAL_ONLY` is off (`all_namespaces`), or the table
/// is not complete, and the port alone decides. A host that forwards sees others' packets
/// on the ports we watch; they are not ours to count.
#[inline(always)]
pub fn ours<const L2: usize>(ctx: &TcContext, ipv6: bool, inbound: bool) -> bool {
    if LOCAL_ONLY.load() == 0 || LOCAL_ADDRESSES_COMPLETE.get(0).is_none_or(|&c| c == 0) {
        return true;
    }
    let mut address = [0u8; 16];
    if ipv6 {
        let at = L2 + if inbound { 24 } else { 8 };
        let Some(ptr) = ptr_at::<[u8; 16]>(ctx, at) else {
            return false;
        };
        // SAFETY: ptr_at checked the 16 bytes.
        address = unsafe { *ptr };
    } else {
        let at = L2 + if inbound { 16 } else { 12 };
        let Some(ptr) = ptr_at::<[u8; 4]>(ctx, at) else {
            return false;
        };
        address[10] = 0xff;
        address[11] = 0xff;
        // SAFETY: ptr_at checked the 4 bytes.
        address[12..].copy_from_slice(&unsafe { *ptr });
    }
    let words = address_words(&address);
    // `::` is what a free slot holds, and no host's address.
    words != [0, 0]
        && local_address_sets(words, LOCAL_ADDRESS_SET_BITS.load())
            .into_iter()
            .any(|set| {
                (0..LOCAL_ADDRESS_WAYS).any(|way| LOCAL_ADDRESSES.get(set + way) == Some(&words))
            })
}

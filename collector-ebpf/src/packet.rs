//! Bounds-checked reads from a packet's linear data: every direct packet read of the
//! classifiers goes through [`ptr_at`].

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use collector_common::{LOCAL_ADDRESS_WAYS, address_words, local_address_sets};

use crate::{LOCAL_ADDRESS_SET_BITS, LOCAL_ADDRESSES, LOCAL_ADDRESSES_COMPLETE, LOCAL_ONLY};

/// The link-layer header before the IP header (`L2` in the parsers) on Ethernet and loopback.
pub const ETH_HLEN: usize = 14;
/// `L2` on an interface whose packets start at the IP header (WireGuard, tun).
pub const NO_LINK_HEADER: usize = 0;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV6_HLEN: usize = 40;
/// IPv6 hop-by-hop options header.
pub const NEXTHDR_HOP: u8 = 0;

/// Bounds-checked pointer to a `T` at `offset` in the packet's linear data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
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

/// Whether the IP header says TCP follows (IPv6: with no extension header between, or a
/// jumbo packet's hop-by-hop header, which the TCP counting looks into). Also true when that
/// byte cannot be read, so that the TCP counting sees the truncated header.
#[inline(always)]
pub fn may_carry_tcp<const L2: usize>(ctx: &TcContext) -> bool {
    match ether_type(ctx) {
        ETH_P_IP => read_u8(ctx, L2 + 9).is_none_or(|protocol| protocol == IPPROTO_TCP),
        ETH_P_IPV6 => read_u8(ctx, L2 + 6).is_none_or(|next| {
            next == IPPROTO_TCP || (next == NEXTHDR_HOP && read_be16(ctx, L2 + 4) == Some(0))
        }),
        _ => false,
    }
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

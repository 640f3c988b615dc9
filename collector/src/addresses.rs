//! The addresses of the agent's network namespace, read over rtnetlink: live traffic and
//! DNS on the interfaces count only packets to or from them (`LOCAL_ADDRESSES`), not what
//! the host forwards. Read at the start and on every poll, as the interfaces are (two dumps,
//! tens of microseconds).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv6Addr},
};

use collector_common::{LOCAL_ADDRESS_WAYS, address_words, local_address_sets};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink_dump;

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// What is local to this namespace.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Its addresses and the single addresses its `local` table routes to it (a load
    /// balancer's address given to the host as a route, not an address), as the kernel
    /// programs key them (IPv4 mapped into IPv6, [`address_words`]).
    pub addresses: BTreeSet<[u64; 2]>,
    /// A `local` route wider than one address (an `AnyIP` range), other than loopback's
    /// 127.0.0.0/8: no table of addresses covers it.
    pub wide_route: Option<String>,
}

/// What is local to the current network namespace now.
pub fn list() -> io::Result<Local> {
    let mut local = Local::default();
    dump(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewAddress(address) = message {
                local.addresses.extend(own_address(&address).map(key));
            }
        },
    )?;
    dump(
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        |message| {
            if let RouteNetlinkMessage::NewRoute(route) = message {
                local_route(&route, &mut local);
            }
        },
    )?;
    Ok(local)
}

/// Sends a dump request and hands each reply to `each`.
fn dump(request: RouteNetlinkMessage, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(request));
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    let mut malformed = None;
    netlink_dump::exchange(NETLINK_ROUTE, &buf, |_, message| {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(inner),
                ..
            }) => each(inner),
            Ok(_) => {}
            Err(err) => malformed = Some(err.to_string()),
        }
    })?;
    match malformed {
        Some(err) => Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        None => Ok(()),
    }
}

/// The interface's own address: `IFA_LOCAL` where there is one (on a point-to-point link
/// `IFA_ADDRESS` is the peer's), else `IFA_ADDRESS`.
fn own_address(message: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        message.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// Takes a route of the `local` table that delivers to this host.
fn local_route(route: &RouteMessage, local: &mut Local) {
    if route.header.table != RT_TABLE_LOCAL || route.header.kind != RouteType::Local {
        return;
    }
    let Some(destination) = route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    }) else {
        return;
    };
    let prefix = route.header.destination_prefix_length;
    let single = if destination.is_ipv4() { 32 } else { 128 };
    if prefix == single {
        local.addresses.insert(key(destination));
    } else if !is_loopback_range(destination, prefix) && local.wide_route.is_none() {
        local.wide_route = Some(format!("{destination}/{prefix}"));
    }
}

/// Loopback's own range, whose packets never leave loopback (not looked up there).
fn is_loopback_range(destination: IpAddr, prefix: u8) -> bool {
    match destination {
        IpAddr::V4(v4) => v4.is_loopback() && prefix >= 8,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

/// The kernel programs' key for `ip`.
#[must_use]
pub fn key(ip: IpAddr) -> [u64; 2] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    address_words(&octets)
}

/// A key as people write the address.
#[must_use]
pub fn ip(key: [u64; 2]) -> IpAddr {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key[0].to_ne_bytes());
    bytes[8..].copy_from_slice(&key[1].to_ne_bytes());
    Ipv6Addr::from(bytes).to_canonical()
}

/// The agent's copy of `LOCAL_ADDRESSES`, and where each address goes: a free slot of
/// either of its two sets.
#[derive(Debug)]
pub struct AddressTable {
    slots: Vec<[u64; 2]>,
    set_bits: u32,
}

/// What [`AddressTable::place`] changed, for the kernel's table, and what did not fit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// (slot, value) to write, frees first.
    pub writes: Vec<(u32, [u64; 2])>,
    /// Addresses with both sets full: not in the table.
    pub unplaced: Vec<[u64; 2]>,
}

impl AddressTable {
    #[must_use]
    pub fn new(slots: u32, set_bits: u32) -> Self {
        Self {
            slots: vec![[0, 0]; slots as usize],
            set_bits,
        }
    }

    /// Brings the table to `now`: frees the slots of addresses gone, then places the new
    /// ones.
    pub fn place(&mut self, now: &BTreeSet<[u64; 2]>) -> Placement {
        let mut placement = Placement::default();
        for (index, slot) in (0..).zip(self.slots.iter_mut()) {
            if *slot != [0, 0] && !now.contains(slot) {
                *slot = [0, 0];
                placement.writes.push((index, [0, 0]));
            }
        }
        for &address in now {
            let ways = local_address_sets(address, self.set_bits)
                .into_iter()
                .flat_map(|set| set..set + LOCAL_ADDRESS_WAYS);
            if ways.clone().any(|index| self.held(index) == Some(address)) {
                continue;
            }
            match ways.clone().find(|&index| self.held(index) == Some([0, 0])) {
                Some(free) => {
                    self.slots[free as usize] = address;
                    placement.writes.push((free, address));
                }
                None => placement.unplaced.push(address),
            }
        }
        placement
    }

    fn held(&self, index: u32) -> Option<[u64; 2]> {
        self.slots.get(index as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use collector_common::{local_address_set_bits, local_address_slots};

    use super::*;

    #[test]
    fn this_namespace_has_its_loopback_addresses() {
        // The unit tests run in the host's namespace, whose loopback is up.
        let local = list().unwrap();
        assert!(
            local
                .addresses
                .contains(&key(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        );
        assert!(
            local
                .addresses
                .contains(&key(IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(ip(key("10.1.2.3".parse().unwrap())).to_string(), "10.1.2.3");
    }

    #[test]
    fn every_service_address_of_a_large_node_finds_a_slot() {
        // kube-proxy in IPVS mode: every ClusterIP an address of the node, 10.96.0.0/12.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let addresses: BTreeSet<[u64; 2]> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let host = u32::try_from(state % (1 << 20)).unwrap();
                key(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 | host)))
            })
            .collect();
        let slots = local_address_slots(addresses.len());
        let mut table = AddressTable::new(slots, local_address_set_bits(slots));
        let placement = table.place(&addresses);
        assert!(
            placement.unplaced.is_empty(),
            "{}",
            placement.unplaced.len()
        );
        assert_eq!(placement.writes.len(), addresses.len());
        // Half go: their slots are freed, and nothing else is written.
        let half: BTreeSet<[u64; 2]> = addresses.iter().copied().step_by(2).collect();
        let placement = table.place(&half);
        assert_eq!(placement.writes.len(), addresses.len() - half.len());
        assert!(placement.writes.iter().all(|&(_, value)| value == [0, 0]));
    }

    #[test]
    fn an_address_with_both_sets_full_is_reported() {
        // Two sets in all, eight slots, for ten addresses.
        let mut table = AddressTable::new(2 * LOCAL_ADDRESS_WAYS, 1);
        let addresses: BTreeSet<[u64; 2]> = (1..=10)
            .map(|n| key(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))))
            .collect();
        let placement = table.place(&addresses);
        assert!(placement.unplaced.len() >= 2, "{placement:?}");
        assert_eq!(placement.writes.len() + placement.unplaced.len(), 10);
    }
}

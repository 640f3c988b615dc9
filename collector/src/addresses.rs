//! The addresses of the agent's network namespace, read over rtnetlink: live traffic counts
//! only packets to or from them (`LOCAL_ADDRESSES`), not what the host forwards. Read at the
//! start and on every poll, as the interfaces are (one dump, tens of microseconds).

use std::{collections::BTreeSet, io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink_dump;

/// Every address of the current network namespace, as the kernel programs key them (IPv4
/// mapped into IPv6).
pub fn list() -> io::Result<BTreeSet<[u8; 16]>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    let mut addresses = BTreeSet::new();
    let mut malformed = None;
    netlink_dump::exchange(NETLINK_ROUTE, &buf, |_, message| {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)),
                ..
            }) => addresses.extend(own_address(&address).map(key)),
            Ok(_) => {}
            Err(err) => malformed = Some(err.to_string()),
        }
    })?;
    match malformed {
        Some(err) => Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        None => Ok(addresses),
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

/// The kernel programs' key for `ip`.
#[must_use]
pub fn key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn this_namespace_has_its_loopback_addresses() {
        let addresses = list().unwrap();
        // The unit tests run in the host's namespace, whose loopback is up.
        assert!(addresses.contains(&key(IpAddr::V4(Ipv4Addr::LOCALHOST))));
        assert!(addresses.contains(&key(IpAddr::V6(Ipv6Addr::LOCALHOST))));
        assert_eq!(
            key("10.1.2.3".parse().unwrap())[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
    }
}

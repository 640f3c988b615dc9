//! The addresses of the agent's network namespace, read over rtnetlink: live traffic and
//! DNS on the interfaces count only packets to or from them (`LOCAL_ADDRESSES`), not what
//! the host forwards. Read at the start, then again only after the kernel announced a change
//! of addresses or routes (a node whose kube-proxy runs in IPVS mode has tens of thousands,
//! and reading them took 25 ms): at once, so that a VIP taken over in a failover counts from
//! its first packets, not from the next poll.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use collector_common::address_words;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::Instant,
};

use crate::netlink_dump;

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;
/// `rtmsg.rtm_type` of a route that delivers to this host (`RTN_LOCAL`).
const RTN_LOCAL: u8 = 2;
/// rtnetlink multicast groups (`linux/rtnetlink.h`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

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
    /// Changes interrupted every read (`NLM_F_DUMP_INTR`): what the reads found together,
    /// which may lack an address that was there all along. The kernel interrupts an address dump
    /// at every IPv4 address added or removed meanwhile, and a dump of 20,000 takes about 50
    /// reads, so while kube-proxy adds thousands of service addresses few reads finish
    /// uninterrupted.
    pub interrupted: bool,
}

impl Local {
    /// Adds what `other` found.
    pub fn merge(&mut self, other: &Local) {
        self.addresses.extend(&other.addresses);
        if self.wide_route.is_none() {
            self.wide_route.clone_from(&other.wide_route);
        }
        self.interrupted |= other.interrupted;
    }
}

/// Reads a [`list`] makes, at most, while changes interrupt them.
const LIST_TRIES: usize = 4;

/// Reads again while changes interrupt the read, [`LIST_TRIES`] times at most, then returns
/// what those reads found together (each may lack what another has).
fn read_settled(read: impl Fn() -> io::Result<Local>) -> io::Result<Local> {
    let mut found = Local::default();
    for _ in 0..LIST_TRIES {
        let local = read()?;
        if !local.interrupted {
            return Ok(local);
        }
        found.merge(&local);
    }
    Ok(found)
}

/// The addresses of the current network namespace now, and the routes of its `local` table.
pub fn list() -> io::Result<Local> {
    read_settled(|| {
        let mut local = Local::default();
        let addresses = netlink_dump::route_dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            |message| {
                if let RouteNetlinkMessage::NewAddress(address) = message
                    && delivered_to(&address)
                {
                    local.addresses.extend(own_address(&address).map(key));
                }
            },
        );
        // The `local` table only (the kernel filters with strict checking on): a router's
        // main table may hold a million routes.
        let routes = local_routes(RT_TABLE_LOCAL, &mut local);
        for read in [addresses, routes] {
            noting_interruption(read, &mut local)?;
        }
        Ok(local)
    })
}

/// The routes of type `local` in the namespace's other tables: those a policy rule
/// reaches, as TPROXY's (`local 0.0.0.0/0 dev lo table 100`, for packets of a mark), which
/// take in packets for addresses of no interface. The kernel filters by type, but walks
/// every route of every table to do it (a tenth of a second for 200,000), so these are
/// read at the start and when such a route is announced, not at every change of addresses.
pub fn list_other_tables() -> io::Result<Local> {
    read_settled(|| {
        let mut local = Local::default();
        let read = local_routes(0, &mut local);
        noting_interruption(read, &mut local)?;
        Ok(local)
    })
}

/// The routes of type `local` of `table` (0: every table but `local`) into `local`.
fn local_routes(table: u8, local: &mut Local) -> io::Result<()> {
    let mut routes = RouteMessage::default();
    routes.header.table = table;
    routes.header.kind = RouteType::Local;
    netlink_dump::route_dump(RouteNetlinkMessage::GetRoute(routes), |message| {
        if let RouteNetlinkMessage::NewRoute(route) = message
            && (table != 0 || table_of(&route) != u32::from(RT_TABLE_LOCAL))
        {
            local_route(&route, local);
        }
    })
}

/// A read's error, but for an interruption, which `local` notes.
fn noting_interruption(read: io::Result<()>, local: &mut Local) -> io::Result<()> {
    match read {
        Err(err) if err.kind() == io::ErrorKind::Interrupted => {
            local.interrupted = true;
            Ok(())
        }
        read => read,
    }
}

/// Tells whether the namespace's addresses, routes or links changed since it last looked: a
/// netlink socket in their multicast groups, read without waiting. Links too, so that the
/// same wake attaches a new interface at once rather than at the next poll.
pub struct ChangeWatch {
    socket: Socket,
    buf: Vec<u8>,
}

impl ChangeWatch {
    /// Made before the first [`list`], so that no change after it goes unseen.
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ] {
            socket.add_membership(group)?;
        }
        socket.set_non_blocking(true)?;
        Ok(Self {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// What was announced since the last call (reads every announcement there is): an
    /// address, or a route of type `local` (a router's others change all the time), in the
    /// `local` table or another. Announcements lost to a full socket buffer count as
    /// changes of both. The socket is read until it is empty, past an overrun too: the
    /// [`ChangeSignal`] only wakes again for what arrives after that.
    pub fn changed(&mut self) -> Changes {
        let mut changed = Changes::default();
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => return changed,
                Ok(size) => changed = changed.and(announced(&self.buf[..size])),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return changed,
                // Announcements were lost: the addresses are read again, and the socket
                // still holds those queued before the overrun.
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => changed = Changes::ALL,
                // Anything else: look again, and read on at the next call.
                Err(_) => return Changes::ALL,
            }
        }
    }

    /// A [`ChangeSignal`] on this socket (a duplicate of its descriptor: the watch is still
    /// what reads the announcements). In a tokio runtime.
    pub fn signal(&self) -> io::Result<ChangeSignal> {
        let socket = self.socket.as_fd().try_clone_to_owned()?;
        // SAFETY: an `OwnedFd` keeps its descriptor open, and the same, until it is dropped
        // with the `AsyncFd`.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?;
        Ok(ChangeSignal {
            socket,
            not_before: Instant::now(),
        })
    }
}

/// Wakes the agent when a [`ChangeWatch`] has announcements waiting, so that the address
/// table and the attached interfaces follow a change within milliseconds. A burst of
/// changes (kube-proxy adding thousands of service addresses) does not keep a core busy with
/// dumps: after a sync the next waits [`SYNC_SPACING_FACTOR`] times as long as that one
/// took, 50 ms at least, and the changes in between are read together.
pub struct ChangeSignal {
    socket: AsyncFd<OwnedFd>,
    not_before: Instant,
}

/// Shortest time between two syncs on announcements.
const MIN_SYNC_SPACING: Duration = Duration::from_millis(50);
/// How many times a sync's own duration the next one waits: syncs on announcements take at
/// most about a twentieth of a core.
const SYNC_SPACING_FACTOR: u32 = 20;

impl ChangeSignal {
    /// Returns when announcements are waiting and a sync is allowed; an error if the socket
    /// cannot be polled.
    pub async fn announced(&self) -> io::Result<()> {
        tokio::time::sleep_until(self.not_before).await;
        // Cleared before the sync drains the socket: an announcement that comes during the
        // drain wakes this again.
        self.socket.readable().await?.clear_ready();
        Ok(())
    }

    /// A sync on announcements took `took`: spaces the next one.
    pub fn synced(&mut self, took: Duration) {
        self.not_before = Instant::now() + (took * SYNC_SPACING_FACTOR).max(MIN_SYNC_SPACING);
    }
}

/// What changed, to read again: the addresses and the `local` table's routes, the routes
/// of type `local` of the other tables ([`list_other_tables`]), and the links.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub local: bool,
    pub other_tables: bool,
    pub links: bool,
}

impl Changes {
    /// What is not known, as after lost announcements: everything may have changed.
    pub const ALL: Self = Self {
        local: true,
        other_tables: true,
        links: true,
    };

    #[must_use]
    pub fn and(self, more: Self) -> Self {
        Self {
            local: self.local || more.local,
            other_tables: self.other_tables || more.other_tables,
            links: self.links || more.links,
        }
    }
}

/// What the netlink messages in `datagram` announce: an address change, or a change of a
/// route that delivers to this host (`rtmsg.rtm_type`, the eighth byte after the header),
/// by its table (`rtm_table`, the fifth).
fn announced(datagram: &[u8]) -> Changes {
    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    let mut changes = Changes::default();
    let mut at = 0;
    while at + netlink_dump::HEADER <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
        let kind = u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]);
        let rtmsg = |offset: usize| datagram.get(at + netlink_dump::HEADER + offset).copied();
        if matches!(kind, RTM_NEWROUTE | RTM_DELROUTE) {
            match (rtmsg(4), rtmsg(7)) {
                (Some(RT_TABLE_LOCAL), Some(RTN_LOCAL)) => changes.local = true,
                (Some(_), Some(RTN_LOCAL)) => changes.other_tables = true,
                (Some(_), Some(_)) => {}
                _ => return Changes::ALL,
            }
        } else if matches!(kind, RTM_NEWLINK | RTM_DELLINK) {
            changes.links = true;
        } else {
            changes.local = true;
        }
        if len < netlink_dump::HEADER {
            return Changes::ALL;
        }
        at += netlink_dump::align4(len);
    }
    changes
}

/// The kernel delivers packets to the address: not an IPv6 one still in its duplicate
/// address detection (unless optimistic, which takes packets meanwhile), nor one whose
/// detection failed (a neighbour holds it: packets to it are that host's, forwarded). The
/// kernel dumps both, without their local route; the end of a detection is announced, and
/// read again then.
fn delivered_to(message: &AddressMessage) -> bool {
    let flags = message.header.flags;
    !flags.contains(AddressHeaderFlags::Dadfailed)
        && (!flags.contains(AddressHeaderFlags::Tentative)
            || flags.contains(AddressHeaderFlags::Optimistic))
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

/// A route's table: `RTA_TABLE`, which holds ids past 255, or the header's.
fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// Takes a route that delivers to this host.
fn local_route(route: &RouteMessage, local: &mut Local) {
    if route.header.kind != RouteType::Local {
        return;
    }
    let prefix = route.header.destination_prefix_length;
    // A route of prefix 0 carries no destination: the whole family's space.
    let unspecified = match route.header.address_family {
        AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    };
    let Some(destination) = route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
        .or(unspecified.filter(|_| prefix == 0))
    else {
        return;
    };
    let single = if destination.is_ipv4() { 32 } else { 128 };
    if prefix == single {
        local.addresses.insert(key(destination));
    } else if !is_loopback_range(destination, prefix) && local.wide_route.is_none() {
        // Its table tells a TPROXY rule's from an AnyIP range in the `local` table.
        let table = match table_of(route) {
            255 => "local".to_owned(),
            table => table.to_string(),
        };
        local.wide_route = Some(format!("{destination}/{prefix} (table {table})"));
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

/// The keys of every address of `network`/`prefix` (at most 2^16 of them, as the config
/// allows).
pub fn range_keys(network: IpAddr, prefix: u8) -> impl Iterator<Item = [u64; 2]> {
    let (start, host_bits) = match network {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 32 - u32::from(prefix)),
        IpAddr::V6(v6) => (u128::from(v6), 128 - u32::from(prefix)),
    };
    let count = 1u128 << host_bits.min(16);
    (0..count).map(move |offset| key(IpAddr::V6(Ipv6Addr::from(start + offset))))
}

/// A key as people write the address.
#[must_use]
pub fn ip(key: [u64; 2]) -> IpAddr {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key[0].to_ne_bytes());
    bytes[8..].copy_from_slice(&key[1].to_ne_bytes());
    Ipv6Addr::from(bytes).to_canonical()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

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
        // ::1 unless IPv6 is off (a host booted with ipv6.disable=1 has no such file).
        let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
            .is_ok_and(|off| off.trim() == "0");
        assert_eq!(
            local
                .addresses
                .contains(&key(IpAddr::V6(Ipv6Addr::LOCALHOST))),
            ipv6
        );
        assert_eq!(ip(key("10.1.2.3".parse().unwrap())).to_string(), "10.1.2.3");
    }

    /// IPv6 addresses the kernel lists but does not deliver to are left out: one waiting for
    /// its duplicate address detection (60 s here) and one whose detection failed (its
    /// neighbour answered for it); one without detection and an optimistic one are in. In a
    /// network namespace of the test's own (made by `unshare` on its thread): needs root.
    #[test]
    fn addresses_in_or_failed_in_their_duplicate_detection_are_not_local() {
        use crate::netns::ip;
        crate::netns::in_new_namespace(|| {
            let sysctl = |path: &str, value: &str| {
                std::fs::write(format!("/proc/sys/net/ipv6/{path}"), value).unwrap();
            };
            ip("link add vdad0 type veth peer name vdad1");
            // The detection's wait for an answer, after its one probe.
            sysctl("neigh/vdad0/retrans_time_ms", "60000");
            sysctl("conf/vdad0/optimistic_dad", "1");
            ip("link set vdad0 up");
            ip("link set vdad1 up");
            ip("addr add fd00:7e::1/64 dev vdad0");
            // The peer holds ::2 and answers vdad0's probe for it; then gives it up.
            ip("addr add fd00:7e::2/64 dev vdad1 nodad");
            ip("addr add fd00:7e::2/64 dev vdad0");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !String::from_utf8(
                std::process::Command::new("ip")
                    .args(["-6", "addr", "show", "dev", "vdad0"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
            .contains("dadfailed")
            {
                assert!(std::time::Instant::now() < deadline, "no failed detection");
                std::thread::sleep(Duration::from_millis(50));
            }
            ip("addr del fd00:7e::2/64 dev vdad1");
            ip("addr add fd00:7e::3/64 dev vdad0 nodad");
            ip("addr add fd00:7e::4/64 dev vdad0 optimistic");
            let local = list().unwrap();
            let has = |address: &str| local.addresses.contains(&key(address.parse().unwrap()));
            assert!(!has("fd00:7e::1"), "in its detection");
            assert!(!has("fd00:7e::2"), "its detection failed");
            assert!(has("fd00:7e::3"), "without detection");
            assert!(has("fd00:7e::4"), "optimistic");
        });
    }

    #[test]
    fn address_local_route_and_link_changes_are_told_apart() {
        // nlmsghdr (length, type) and an rtmsg with its table in its fifth byte and its
        // route type in its eighth.
        const RTN_UNICAST: u8 = 1;
        let route = |kind: u16, table: u8, route_type: u8| {
            let mut message = vec![0u8; 28];
            message[..4].copy_from_slice(&28u32.to_ne_bytes());
            message[4..6].copy_from_slice(&kind.to_ne_bytes());
            message[20] = table;
            message[23] = route_type;
            message
        };
        let none = Changes::default();
        let local = Changes {
            local: true,
            ..none
        };
        let other_tables = Changes {
            other_tables: true,
            ..none
        };
        assert_eq!(announced(&route(24, 254, RTN_UNICAST)), none);
        assert_eq!(
            announced(&[route(24, 254, RTN_UNICAST), route(25, 100, RTN_UNICAST)].concat()),
            none
        );
        assert_eq!(
            announced(&[route(24, 254, RTN_UNICAST), route(25, 255, RTN_LOCAL)].concat()),
            local
        );
        // TPROXY's route.
        assert_eq!(announced(&route(24, 100, RTN_LOCAL)), other_tables);
        assert_eq!(
            announced(&[route(24, 100, RTN_LOCAL), route(20, 0, 0)].concat()),
            local.and(other_tables)
        );
        // RTM_NEWADDR.
        assert_eq!(announced(&route(20, 0, 0)), local);
        // RTM_NEWLINK and RTM_DELLINK: the links alone.
        let links = Changes {
            links: true,
            ..none
        };
        assert_eq!(announced(&route(16, 0, 0)), links);
        assert_eq!(
            announced(&[route(17, 0, 0), route(20, 0, 0)].concat()),
            local.and(links)
        );
        // A route message cut short: what it was is not known.
        assert_eq!(announced(&route(24, 100, RTN_LOCAL)[..20]), Changes::ALL);
    }

    #[test]
    fn a_range_stands_for_each_of_its_addresses() {
        let keys: Vec<_> = range_keys("198.51.100.0".parse().unwrap(), 28).collect();
        assert_eq!(keys.len(), 16);
        assert_eq!(ip(keys[0]).to_string(), "198.51.100.0");
        assert_eq!(ip(keys[15]).to_string(), "198.51.100.15");
        let keys: Vec<_> = range_keys("2001:db8::".parse().unwrap(), 112).collect();
        assert_eq!(keys.len(), 65_536);
        assert_eq!(ip(keys[65_535]).to_string(), "2001:db8::ffff");
        assert_eq!(range_keys("203.0.113.10".parse().unwrap(), 32).count(), 1);
    }

    #[test]
    fn a_local_route_of_prefix_zero_is_a_range() {
        // The kernel sends no destination for it: `ip route add local 0.0.0.0/0 dev lo
        // table local` makes every IPv4 address this host's.
        let mut route = RouteMessage::default();
        route.header.kind = RouteType::Local;
        route.header.address_family = AddressFamily::Inet;
        let mut local = Local::default();
        local_route(&route, &mut local);
        assert_eq!(local.wide_route.as_deref(), Some("0.0.0.0/0 (table 0)"));
        // TPROXY's, reached by a policy rule: every IPv6 address, in table 100.
        route.header.address_family = AddressFamily::Inet6;
        route.attributes.push(RouteAttribute::Table(100));
        let mut local = Local::default();
        local_route(&route, &mut local);
        assert_eq!(local.wide_route.as_deref(), Some("::/0 (table 100)"));
        route.header.table = 255;
        route.attributes.clear();
        let mut local = Local::default();
        local_route(&route, &mut local);
        assert_eq!(local.wide_route.as_deref(), Some("::/0 (table local)"));
    }
}

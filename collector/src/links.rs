//! Network interfaces of the agent's namespace, read over rtnetlink: which ones exist, are
//! up, carry a framing that the tc classifiers parse ([`Framing`]), and their kernel counters
//! (stats64). Read on every poll and when the kernel announces a change: that keeps the
//! attached set current (an interface that appears is attached when it is announced) and
//! the counters fresh. The links are dumped again
//! only after the kernel announced a change (`RTNLGRP_LINK`), with no counters and only the
//! attributes used read; the counters come from an `RTM_GETSTATS` dump of stats64 alone.
//! With 1,200 links a poll costs 0.25 ms (1.2 ms after a change); the full dump read by
//! netlink-packet-route every poll cost 17 to 26 ms, a core's 2 % at one poll a second. With
//! 3 links: 5 µs (50 µs before).

use std::{
    io,
    sync::{Mutex, PoisonError},
};

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::{
    netlink_dump::{self, HEADER, NLM_F_DUMP},
    netns,
};

/// An interface as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The device's alternative names (`IFLA_ALT_IFNAME`: `ip link` shows them as
    /// `altname`, as systemd gives a NIC its path-based name beside `ens5`), which
    /// `interfaces` and `exclude_interfaces` match as they match its name.
    pub alt_names: Vec<String>,
    pub up: bool,
    /// Where the tc classifiers find the IP header.
    pub framing: Framing,
    pub loopback: bool,
    /// Index of the device this one is enslaved to (`IFLA_MASTER`), if any.
    pub controller: Option<u32>,
    /// Index of the device this one sends and receives through (`IFLA_LINK`: a macvlan's
    /// or a VLAN's lower device, a veth's peer), when that device is in this namespace.
    pub lower: Option<u32>,
    /// The device's kind (`IFLA_INFO_KIND`: "bond", "bridge", "vlan", ...); empty for a
    /// physical one.
    pub kind: String,
    /// The kernel's counters for the interface (`RTM_GETSTATS`'s `IFLA_STATS_LINK_64`);
    /// `None` where the reply had none (never from a kernel that answers `RTM_GETSTATS`):
    /// zeros would read as a counter reset.
    pub stats: Option<InterfaceStats>,
}

impl Link {
    /// Its name, then its alternative names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.alt_names.iter().map(String::as_str))
    }

    /// Whether `name` is its name or one of its alternative names.
    pub fn named(&self, name: &str) -> bool {
        self.names().any(|own| own == name)
    }
}

/// Controllers that pass their ports' packets up through their own device, whose hooks then
/// see them a second time: their ports are left out of the default selection.
const LAYER2_CONTROLLERS: [&str; 4] = ["bond", "bridge", "team", "openvswitch"];

/// Devices whose every packet also crosses their lower device's hooks, untagged (a packet
/// for a macvlan comes in through the lower device, and one sent from it goes out through
/// it): left out of the default selection when their lower device is watched, as
/// keepalived's VRRP macvlans (`use_vmac`) are next to the interface they sit on. (A VLAN's
/// packets carry their tag on the lower device, where the classifiers leave them. ipvlan
/// would belong here too, but the kernels the tests run on lack it.)
const UPPER_DEVICES: [&str; 2] = ["macvlan", "macvtap"];

/// Devices that only carry packets other devices' hooks see: an ifb gets them redirected from
/// another device's tc hook (egress or ingress shaping) and hands them back to it, so
/// watching it would count each of them again. Left out of the default selection.
const REDIRECT_TARGETS: [&str; 1] = ["ifb"];

/// An interface's own counters, as `ip -s link` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    /// Dropped by the device for lack of buffer space (`rx_missed_errors`: its receive ring
    /// was full), which `rx_dropped` leaves out; `ip -s -s link` shows it as "missed".
    pub rx_missed: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// rtnetlink message types, attributes and flags (`linux/rtnetlink.h`, `linux/if_link.h`).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWSTATS: u16 = 92;
const RTM_GETSTATS: u16 = 94;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_PROP_LIST: u16 = 52;
const IFLA_ALT_IFNAME: u16 = 53;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const IFLA_STATS_LINK_64: u16 = 1;
const IFF_UP: u32 = 1;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// No link-layer header: WireGuard and tun devices.
const ARPHRD_NONE: u16 = 0xfffe;
/// `struct ifinfomsg`.
const IFINFOMSG: usize = 16;

/// How an interface's packets begin, for the tc classifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// An Ethernet header (loopback's has the same 14 bytes): the IP header at offset 14.
    Ethernet,
    /// No link-layer header (`ARPHRD_NONE`: WireGuard, tun): the IP header first.
    Ip,
    /// Anything else (IP-in-IP and GRE tunnels, PPP, InfiniBand, ...), by its link-layer
    /// type (`ARPHRD_*`): not parsed, and so not watched.
    Other(u16),
}

impl Framing {
    fn of(link_layer_type: u16) -> Self {
        match link_layer_type {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => Self::Ethernet,
            ARPHRD_NONE => Self::Ip,
            other => Self::Other(other),
        }
    }

    /// The tc classifiers can parse it.
    #[must_use]
    pub fn parsed(self) -> bool {
        !matches!(self, Self::Other(_))
    }
}
/// `struct if_stats_msg`.
const IF_STATS_MSG: usize = 12;

/// The links of the last dump and the socket that says when they changed. Process-wide, not
/// a watch the poll loop owns as `addresses::ChangeWatch` is: the start, the polls and
/// `collector check` all read the links through [`list`].
static KNOWN: Mutex<Option<Known>> = Mutex::new(None);

/// rtnetlink's multicast group for links added, removed and changed (`RTNLGRP_LINK`).
const RTNLGRP_LINK: u32 = 1;

/// The links as last dumped (counters zero), kept until the kernel announces a change.
struct Known {
    /// Subscribed to `RTNLGRP_LINK` before the dump: every link added, removed, renamed, set
    /// up or down, enslaved or released since is announced on it.
    announcements: Socket,
    buf: Vec<u8>,
    /// The namespace the socket and the links belong to (`SO_NETNS_COOKIE`).
    namespace: u64,
    links: Option<Vec<Link>>,
}

impl Known {
    fn new(namespace: u64) -> io::Result<Self> {
        let mut announcements = Socket::new(NETLINK_ROUTE)?;
        announcements.bind_auto()?;
        announcements.add_membership(RTNLGRP_LINK)?;
        announcements.set_non_blocking(true)?;
        Ok(Self {
            announcements,
            buf: vec![0; 64 * 1024],
            namespace,
            links: None,
        })
    }

    /// Whether anything was announced since the last call, reading every announcement there
    /// is. Announcements lost to a full socket buffer (`ENOBUFS`) count as a change.
    fn changed(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self.announcements.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                Err(_) => return true,
            }
        }
    }
}

/// Every interface in the current network namespace, with its counters. The links are
/// dumped again only when the kernel announced a change since the last dump (or in another
/// namespace than the last call's): on a node with hundreds of pod veths, dumping them
/// every poll cost about 1 µs a link even read by hand. The counters are read each call,
/// about 0.2 µs a link.
pub fn list() -> io::Result<Vec<Link>> {
    let mut known = KNOWN.lock().unwrap_or_else(PoisonError::into_inner);
    // Without a namespace cookie (before Linux 5.14) or a socket, every call dumps.
    let namespace = netns::current_cookie().ok();
    if known.as_ref().map(|k| Some(k.namespace)) != Some(namespace) {
        *known = namespace.and_then(|namespace| Known::new(namespace).ok());
    }
    // Read the announcements before the dump: one that comes during it dumps again next time.
    // What changed is forgotten at once, so that a dump that fails is tried again next time.
    let cached = known.as_mut().and_then(|k| {
        if k.changed() {
            k.links = None;
        }
        k.links.clone()
    });
    let links = if let Some(links) = cached {
        links
    } else {
        let links = netlink_dump::retry_interrupted(dump_links)?;
        if let Some(k) = known.as_mut() {
            k.links = Some(links.clone());
        }
        links
    };
    drop(known);
    with_stats(links)
}

/// Whether the interface named as `link` is still the device of `link`'s index: not
/// deleted, renamed or recreated (a new device, a new index) since `link` was read. A look-up
/// that fails for another reason than a missing device (no socket to ask with) says nothing
/// either way: taken as there, so that what is attached stays and a real error is reported.
pub fn still_there(link: &Link) -> bool {
    let Ok(name) = std::ffi::CString::new(link.name.as_str()) else {
        return false;
    };
    // SAFETY: a NUL-terminated name; the call reads nothing else.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => !matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODEV | libc::ENXIO)
        ),
        index => index == link.index,
    }
}

#[cfg(test)]
thread_local! {
    /// How many link dumps [`list`] made on this thread, for the tests.
    static DUMPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Every link, by index, with zero counters.
fn dump_links() -> io::Result<Vec<Link>> {
    #[cfg(test)]
    DUMPS.set(DUMPS.get() + 1);
    let mut links = Vec::new();
    netlink_dump::route_dump_raw(&link_request(), |kind, message| {
        if kind == RTM_NEWLINK {
            links.push(parse_link(&message[HEADER..])?);
        }
        Ok(())
    })?;
    links.sort_unstable_by_key(|l| l.index);
    Ok(links)
}

/// `links` (by index) with their counters. A link the counters' dump did not have is gone
/// and left out (zero counters would read as a counter reset); one that came after the
/// link dump is in the next.
fn with_stats(mut links: Vec<Link>) -> io::Result<Vec<Link>> {
    let counted = netlink_dump::retry_interrupted(|| {
        let mut counted = vec![false; links.len()];
        netlink_dump::route_dump_raw(&stats_request(), |kind, message| {
            if kind == RTM_NEWSTATS {
                let (index, stats) = parse_stats(&message[HEADER..])?;
                // Without its 64-bit counters the link stays listed (left out, it would be
                // taken for gone, and detached), with no counters to export.
                if let Ok(at) = links.binary_search_by_key(&index, |l| l.index) {
                    links[at].stats = stats;
                    counted[at] = true;
                }
            }
            Ok(())
        })?;
        Ok(counted)
    })?;
    let mut counted = counted.into_iter();
    links.retain(|_| counted.next().unwrap_or(false));
    Ok(links)
}

/// `RTM_GETLINK` for every link, without their counters (`RTEXT_FILTER_SKIP_STATS`): those
/// are most of the message and the kernel sums them over every CPU, IPv6's 37 included.
fn link_request() -> Vec<u8> {
    let mut body = vec![0; IFINFOMSG]; // any family, type, index and flags: strict checking
    netlink_dump::put_attribute(
        &mut body,
        IFLA_EXT_MASK,
        &RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    );
    netlink_dump::request(RTM_GETLINK, NLM_F_DUMP, &body)
}

/// `RTM_GETSTATS` for every link, of `IFLA_STATS_LINK_64` only.
fn stats_request() -> Vec<u8> {
    let mut body = vec![0; IF_STATS_MSG];
    let filter = 1u32 << (IFLA_STATS_LINK_64 - 1);
    body[8..12].copy_from_slice(&filter.to_ne_bytes());
    netlink_dump::request(RTM_GETSTATS, NLM_F_DUMP, &body)
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a malformed link message: {what}"),
    )
}

fn u32_of(payload: &[u8]) -> io::Result<u32> {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| malformed("a 32-bit attribute cut short"))
}

/// A string attribute: up to its first NUL; a name that is not UTF-8 (Linux allows it) with
/// U+FFFD in place of what is not.
fn string_of(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// A `RTM_NEWLINK` message's body (`ifinfomsg` and its attributes): only the attributes the
/// agent uses are looked at, the rest (IPv4 and IPv6 settings, most of it) skipped.
fn parse_link(body: &[u8]) -> io::Result<Link> {
    let header = body
        .get(..IFINFOMSG)
        .ok_or_else(|| malformed("its ifinfomsg cut short"))?;
    let link_layer_type = u16::from_ne_bytes([header[2], header[3]]);
    let index = u32_of(&header[4..8])?;
    let flags = u32_of(&header[8..12])?;
    let mut link = Link {
        index,
        name: String::new(),
        alt_names: Vec::new(),
        up: flags & IFF_UP != 0,
        framing: Framing::of(link_layer_type),
        loopback: link_layer_type == ARPHRD_LOOPBACK,
        controller: None,
        lower: None,
        kind: String::new(),
        stats: None,
    };
    let (mut lower, mut lower_elsewhere) = (None, false);
    for attribute in netlink_dump::attributes(&body[IFINFOMSG..]) {
        let (kind, payload) = attribute?;
        match kind {
            IFLA_IFNAME => link.name = string_of(payload),
            IFLA_MASTER => link.controller = Some(u32_of(payload)?),
            IFLA_LINK => lower = Some(u32_of(payload)?),
            // The IFLA_LINK index is another namespace's.
            IFLA_LINK_NETNSID => lower_elsewhere = true,
            IFLA_PROP_LIST => {
                for property in netlink_dump::attributes(payload) {
                    if let (IFLA_ALT_IFNAME, alt_name) = property? {
                        link.alt_names.push(string_of(alt_name));
                    }
                }
            }
            IFLA_LINKINFO => {
                for info in netlink_dump::attributes(payload) {
                    if let (IFLA_INFO_KIND, kind) = info? {
                        link.kind = string_of(kind);
                    }
                }
            }
            _ => {}
        }
    }
    link.lower = lower.filter(|&index| index != 0 && !lower_elsewhere);
    Ok(link)
}

/// A `RTM_NEWSTATS` message's body: the link's index and its `IFLA_STATS_LINK_64`, if it
/// has them.
fn parse_stats(body: &[u8]) -> io::Result<(u32, Option<InterfaceStats>)> {
    let header = body
        .get(..IF_STATS_MSG)
        .ok_or_else(|| malformed("its if_stats_msg cut short"))?;
    let index = u32_of(&header[4..8])?;
    let mut stats = None;
    for attribute in netlink_dump::attributes(&body[IF_STATS_MSG..]) {
        if let (IFLA_STATS_LINK_64, payload) = attribute? {
            // struct rtnl_link_stats64 begins rx and tx packets, bytes, errors, dropped;
            // rx_missed_errors is its sixteenth.
            let counter = |n: usize| {
                payload
                    .get(n * 8..n * 8 + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_ne_bytes)
                    .ok_or_else(|| malformed("its rtnl_link_stats64 cut short"))
            };
            stats = Some(InterfaceStats {
                rx_packets: counter(0)?,
                tx_packets: counter(1)?,
                rx_bytes: counter(2)?,
                tx_bytes: counter(3)?,
                rx_errors: counter(4)?,
                tx_errors: counter(5)?,
                rx_dropped: counter(6)?,
                tx_dropped: counter(7)?,
                rx_missed: counter(15)?,
            });
        }
    }
    Ok((index, stats))
}

/// The indexes of the ifb devices among `links`.
pub fn redirect_devices(links: &[Link]) -> impl Iterator<Item = u32> + '_ {
    links
        .iter()
        .filter(|link| REDIRECT_TARGETS.contains(&link.kind.as_str()))
        .map(|link| link.index)
}

/// Whether `link` is watched when no interfaces are configured: up, with a parsed framing,
/// not the port of a bond, bridge, team or Open vSwitch, whose packets the controller's
/// own device sees again (counting both would count them twice; a VRF's ports stay, as the
/// VRF device's hooks do not see their packets), not a macvlan whose lower device is
/// watched, which sees its packets too, and not an ifb.
pub fn watched_by_default(link: &Link, all: &[Link]) -> bool {
    watched_by_default_if_up(link, all, |link| link.up)
}

/// [`watched_by_default`], with `up` saying which links count as up: the agent keeps a
/// watched interface that went down, and its macvlans stay left to it, where they would be
/// watched through the outage and count its packets again when it comes back, until the
/// next sync.
pub fn watched_by_default_if_up(link: &Link, all: &[Link], up: impl Fn(&Link) -> bool) -> bool {
    let upper_of_watched = UPPER_DEVICES.contains(&link.kind.as_str())
        && link.lower.is_some_and(|index| {
            all.iter()
                .any(|other| other.index == index && countable_on_its_own(other, all, &up))
        });
    countable_on_its_own(link, all, &up)
        && !upper_of_watched
        && !REDIRECT_TARGETS.contains(&link.kind.as_str())
}

/// Up interfaces that the default selection leaves out for their framing alone (an IP-in-IP
/// tunnel such as Calico's `tunl0`, GRE, PPP, InfiniBand): their live traffic and DNS go
/// uncounted, where the connections' figures (from the sockets) do not. Said, not hidden:
/// by index, and named with their link-layer type. None where interfaces are listed, and
/// none that a pattern excludes: those are left out on purpose.
pub fn unparsed_up<'a>(
    links: &'a [Link],
    watched: Watched<'a>,
) -> impl Iterator<Item = (u32, String)> + 'a {
    let by_default = watched.by_default();
    links
        .iter()
        .filter(move |link| by_default && link.up && !watched.excludes(link))
        .filter_map(|link| {
            let Framing::Other(link_type) = link.framing else {
                return None;
            };
            Some((link.index, format!("{} (link type {link_type})", link.name)))
        })
}

/// The interfaces the default selection would take that an `exclude_interfaces` pattern
/// leaves out (none where interfaces are listed).
pub fn excluded<'a>(links: &'a [Link], watched: Watched<'a>) -> impl Iterator<Item = &'a Link> {
    links.iter().filter(move |link| {
        watched.by_default() && watched.excludes(link) && watched_by_default(link, links)
    })
}

/// Names of excluded interfaces the start's log and `collector check` show before they only
/// count the rest.
pub const EXCLUDED_SHOWN: usize = 10;

/// `names` for a log line or a verdict: the first `shown`, then how many more (a node's
/// hundreds of pod veths as a count).
pub fn name_list(names: &[&str], shown: usize) -> String {
    let more = names.len().saturating_sub(shown);
    let listed = names[..names.len() - more].join(", ");
    if more > 0 {
        format!("{listed} and {more} more")
    } else {
        listed
    }
}

/// Up (as `up` says), with a parsed framing, and not the port of a layer-2 controller.
fn countable_on_its_own(link: &Link, all: &[Link], up: impl Fn(&Link) -> bool) -> bool {
    let port_of_layer2_controller = link.controller.is_some_and(|index| {
        all.iter()
            .any(|other| other.index == index && LAYER2_CONTROLLERS.contains(&other.kind.as_str()))
    });
    up(link) && link.framing.parsed() && !port_of_layer2_controller
}

/// Which interfaces the agent watches: those `listed` (`interfaces`), or with none listed
/// the default selection ([`watched_by_default`]) less the names an `excluded` pattern
/// matches (`exclude_interfaces`). Only the names are matched (the device's own and its
/// alternative names): the ports of an excluded bridge and the macvlans of an excluded
/// device are not watched in its place.
#[derive(Clone, Copy, Debug)]
pub struct Watched<'a> {
    pub listed: &'a [String],
    pub excluded: &'a [glob::Pattern],
}

impl<'a> Watched<'a> {
    pub fn of(config: &'a crate::config::Config) -> Self {
        Self {
            listed: &config.interfaces,
            excluded: &config.exclude_interfaces,
        }
    }

    /// The listed names, nothing excluded.
    #[cfg(test)]
    pub const fn listed(names: &'a [String]) -> Self {
        Self {
            listed: names,
            excluded: &[],
        }
    }

    /// Whether nothing is listed: the default selection applies.
    pub const fn by_default(self) -> bool {
        self.listed.is_empty()
    }

    /// Whether the default selection leaves `link` out: a pattern matches its name or one
    /// of its alternative names.
    pub fn excludes(self, link: &Link) -> bool {
        link.names()
            .any(|name| self.excluded.iter().any(|pattern| pattern.matches(name)))
    }
}

/// The links to attach to at start, and the configured names not there yet.
#[derive(Debug)]
pub struct Selection<'a> {
    pub links: Vec<&'a Link>,
    /// Configured names with no interface of this namespace, or with one of a framing the
    /// classifiers do not parse: not counted, and attached when one they parse is there.
    pub missing: Vec<String>,
    /// Of `missing`, those here of a framing not parsed, named with their link-layer type.
    pub unparsed: Vec<String>,
}

/// The links to attach to: the configured names that exist with a parsed framing, the
/// others left to appear later (one here of a framing not parsed too: a start refused for it
/// crash-looped a pod whose node made it after an earlier start had taken it for missing),
/// or with none configured those [`watched_by_default`], loopback included, that no pattern
/// excludes.
pub fn selection<'a>(links: &'a [Link], watched: Watched<'_>) -> Selection<'a> {
    let mut selected = Selection {
        links: Vec::new(),
        missing: Vec::new(),
        unparsed: Vec::new(),
    };
    if watched.by_default() {
        selected.links = links
            .iter()
            .filter(|l| watched_by_default(l, links) && !watched.excludes(l))
            .collect();
        return selected;
    }
    for name in watched.listed {
        match links.iter().find(|l| l.named(name)) {
            None => selected.missing.push(name.clone()),
            // Listed by its name and by an alternative name: attached once.
            Some(link) if selected.links.iter().any(|l| l.index == link.index) => {}
            Some(link) => match link.framing {
                Framing::Other(link_type) => {
                    selected.missing.push(name.clone());
                    selected
                        .unparsed
                        .push(format!("{name} (link type {link_type})"));
                }
                _ => selected.links.push(link),
            },
        }
    }
    selected
}

/// The configured names that no interface with a parsed framing has (yet): not attached.
pub fn missing(links: &[Link], configured: &[String]) -> Vec<String> {
    configured
        .iter()
        .filter(|name| !links.iter().any(|l| l.named(name) && l.framing.parsed()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::ip;

    fn link(index: u32, name: &str, up: bool, parsed: bool) -> Link {
        Link {
            index,
            name: name.into(),
            alt_names: Vec::new(),
            up,
            framing: if parsed {
                Framing::Ethernet
            } else {
                Framing::Other(32)
            },
            loopback: name == "lo",
            controller: None,
            lower: None,
            kind: String::new(),
            stats: None,
        }
    }

    /// The names of the links watched by default among `links`.
    fn selected_by_default(links: &[Link]) -> Vec<&str> {
        selection(links, Watched::listed(&[]))
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect()
    }

    fn port(index: u32, name: &str, controller: u32) -> Link {
        Link {
            controller: Some(controller),
            ..link(index, name, true, true)
        }
    }

    fn controller(index: u32, name: &str, kind: &str) -> Link {
        Link {
            kind: kind.into(),
            ..link(index, name, true, true)
        }
    }

    #[test]
    fn an_interface_is_still_there_only_under_its_name_and_index() {
        let lo = list()
            .unwrap()
            .into_iter()
            .find(|l| l.loopback)
            .expect("lo is listed");
        assert!(still_there(&lo));
        // Recreated (a new index), renamed or deleted (the name means another device, or
        // none), or a name no device can have.
        assert!(!still_there(&link(lo.index + 100_000, "lo", true, true)));
        assert!(!still_there(&link(lo.index, "collector-none0", true, true)));
        assert!(!still_there(&link(lo.index, "l\0o", true, true)));
    }

    #[test]
    fn ports_of_bonds_and_bridges_are_left_to_their_controller() {
        let links = [
            link(1, "lo", true, true),
            controller(2, "bond0", "bond"),
            port(3, "eth0", 2),
            port(4, "eth1", 2),
            controller(5, "br0", "bridge"),
            port(6, "veth1", 5),
            controller(7, "vrf-blue", "vrf"),
            port(8, "eth2", 7),
            controller(9, "bond0.100", "vlan"),
        ];
        let names = selected_by_default(&links);
        assert_eq!(
            names,
            ["lo", "bond0", "br0", "vrf-blue", "eth2", "bond0.100"]
        );
        // Configured by name, a port is attached as asked.
        assert_eq!(
            selection(&links, Watched::listed(&["eth0".into()])).links[0].name,
            "eth0"
        );
    }

    #[test]
    fn macvlans_are_left_to_a_watched_lower_device() {
        let upper = |index, name: &str, kind: &str, lower| Link {
            kind: kind.into(),
            lower: Some(lower),
            ..link(index, name, true, true)
        };
        let links = [
            link(1, "lo", true, true),
            link(2, "eth0", true, true),
            upper(3, "vrrp.51", "macvlan", 2),
            upper(4, "macvtap0", "macvtap", 2),
            link(5, "eth1", false, true),
            upper(6, "mv1", "macvlan", 5),
            upper(7, "eth0.7", "vlan", 2),
        ];
        let names = selected_by_default(&links);
        // mv1's lower device is down, and so not watched: mv1 counts its own packets.
        assert_eq!(names, ["lo", "eth0", "mv1", "eth0.7"]);
        // Unless the agent keeps it while down: its macvlans stay left to it.
        let kept = |link: &Link| link.up || link.index == 5;
        let names: Vec<&str> = links
            .iter()
            .filter(|link| watched_by_default_if_up(link, &links, kept))
            .map(|link| link.name.as_str())
            .collect();
        assert_eq!(names, ["lo", "eth0", "eth1", "eth0.7"]);
    }

    #[test]
    fn default_selection_is_every_up_ethernet_link() {
        let links = [
            link(1, "lo", true, true),
            link(2, "eth0", true, true),
            link(3, "eth1", false, true),
            link(4, "wg0", true, false),
        ];
        let names = selected_by_default(&links);
        assert_eq!(names, ["lo", "eth0"]);
    }

    #[test]
    fn an_ifb_is_left_to_the_devices_that_redirect_to_it() {
        let ifb = Link {
            kind: "ifb".into(),
            ..link(3, "ifb0", true, true)
        };
        let links = [link(1, "lo", true, true), link(2, "eth0", true, true), ifb];
        let names = selected_by_default(&links);
        assert_eq!(names, ["lo", "eth0"]);
        // Named, it is watched.
        assert_eq!(
            selection(&links, Watched::listed(&["ifb0".into()]))
                .links
                .len(),
            1
        );
    }

    #[test]
    fn excluded_names_are_left_out_of_the_default_selection_only() {
        let links = [
            link(1, "lo", true, true),
            link(2, "eth0", true, true),
            link(3, "cali1a2b", true, true),
            link(4, "lxc9", true, true),
            link(5, "tunl0", true, false),
            link(6, "gre0", true, false),
        ];
        let patterns = [
            glob::Pattern::new("cali*").unwrap(),
            glob::Pattern::new("lxc?").unwrap(),
            glob::Pattern::new("tunl[0-9]").unwrap(),
        ];
        let watched = Watched {
            listed: &[],
            excluded: &patterns,
        };
        let names: Vec<&str> = selection(&links, watched)
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["lo", "eth0"]);
        // Counted as excluded: what the default would have taken (not the tunnel).
        let excluded_names: Vec<&str> =
            excluded(&links, watched).map(|l| l.name.as_str()).collect();
        assert_eq!(excluded_names, ["cali1a2b", "lxc9"]);
        assert_eq!(name_list(&excluded_names, 1), "cali1a2b and 1 more");
        assert_eq!(name_list(&excluded_names, 2), "cali1a2b, lxc9");
        // An excluded tunnel is not reported as uncounted: it is left out on purpose.
        let unparsed: Vec<String> = unparsed_up(&links, watched).map(|(_, name)| name).collect();
        assert_eq!(unparsed, ["gre0 (link type 32)"]);
        // Listed names: nothing reported, whatever the framing.
        let listed = ["lo".to_owned()];
        assert_eq!(unparsed_up(&links, Watched::listed(&listed)).count(), 0);
        assert_eq!(
            excluded(
                &links,
                Watched {
                    listed: &listed,
                    excluded: &patterns
                }
            )
            .count(),
            0
        );
    }

    #[test]
    fn configured_links_of_a_framing_not_parsed_or_not_here_are_missing() {
        let links = [link(1, "lo", true, true), link(4, "ib0", true, false)];
        assert_eq!(
            selection(&links, Watched::listed(&["lo".into()]))
                .links
                .len(),
            1
        );
        let selected = selection(&links, Watched::listed(&["eth9".into(), "lo".into()]));
        assert_eq!(selected.links.len(), 1);
        assert_eq!(selected.missing, ["eth9"]);
        assert!(selected.unparsed.is_empty());
        // Not refused: a start that refused it would crash-loop where it came after one.
        let selected = selection(
            &links,
            Watched::listed(&["ib0".into(), "eth9".into(), "lo".into()]),
        );
        assert_eq!(selected.links.len(), 1);
        assert_eq!(selected.missing, ["ib0", "eth9"]);
        assert_eq!(selected.unparsed, ["ib0 (link type 32)"]);
        assert_eq!(
            missing(&links, &["lo".into(), "ib0".into(), "eth9".into()]),
            ["ib0", "eth9"]
        );
    }

    /// An interface listed by an alternative name (`ip link` shows `altname enp0s5` beside
    /// `ens5`) is that interface: attached, not missing, and once where both names are
    /// listed; a pattern matching an alternative name excludes it. Parsed from the dump's
    /// `IFLA_PROP_LIST` (until 2026-12-07 it was skipped, and such an interface read missing
    /// for ever).
    #[test]
    fn interfaces_are_matched_by_their_alternative_names_too() {
        let put = netlink_dump::put_attribute;
        let mut properties = Vec::new();
        put(&mut properties, IFLA_ALT_IFNAME, b"enp0s5\0");
        put(
            &mut properties,
            IFLA_ALT_IFNAME,
            b"uplink-of-rack-12-left\0",
        );
        let mut attributes = Vec::new();
        put(&mut attributes, IFLA_IFNAME, b"ens5\0");
        put(&mut attributes, IFLA_PROP_LIST | 0x8000, &properties); // NLA_F_NESTED
        let ens5 = parse_link(&link_message(2, &attributes)).unwrap();
        assert_eq!(ens5.name, "ens5");
        assert_eq!(ens5.alt_names, ["enp0s5", "uplink-of-rack-12-left"]);
        let links = [link(1, "lo", true, true), ens5];
        for listed in [
            vec!["enp0s5".to_owned()],
            vec!["uplink-of-rack-12-left".to_owned()],
            vec!["ens5".to_owned(), "enp0s5".to_owned()],
        ] {
            let selected = selection(&links, Watched::listed(&listed));
            let indexes: Vec<u32> = selected.links.iter().map(|l| l.index).collect();
            assert_eq!(indexes, [2], "{listed:?}");
            assert!(selected.missing.is_empty(), "{listed:?}");
            assert!(missing(&links, &listed).is_empty(), "{listed:?}");
        }
        let excluded = [glob::Pattern::new("enp*").unwrap()];
        let watched = Watched {
            listed: &[],
            excluded: &excluded,
        };
        let left_out: Vec<&str> = super::excluded(&links, watched)
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(left_out, ["ens5"]);
    }

    /// A `RTM_NEWLINK` body: `ifinfomsg` for `index` (up, Ethernet) and `attributes`.
    fn link_message(index: u32, attributes: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 0];
        body.extend_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&(IFF_UP | 0x1000).to_ne_bytes()); // and IFF_LOWER_UP
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(attributes);
        body
    }

    fn macvlan_attributes(netnsid: bool) -> Vec<u8> {
        let put = netlink_dump::put_attribute;
        let mut info = Vec::new();
        put(&mut info, IFLA_INFO_KIND, b"macvlan\0");
        put(&mut info, 2, &[0; 8]); // IFLA_INFO_DATA
        let mut attributes = Vec::new();
        put(&mut attributes, IFLA_IFNAME, b"vrrp.51\0");
        put(&mut attributes, 4, &1500u32.to_ne_bytes()); // IFLA_MTU
        put(&mut attributes, IFLA_MASTER, &9u32.to_ne_bytes());
        put(&mut attributes, IFLA_LINK, &2u32.to_ne_bytes());
        if netnsid {
            put(&mut attributes, IFLA_LINK_NETNSID, &0i32.to_ne_bytes());
        }
        put(&mut attributes, IFLA_LINKINFO | 0x8000, &info); // NLA_F_NESTED
        put(&mut attributes, 26, &[7; 600]); // IFLA_AF_SPEC: skipped
        attributes
    }

    #[test]
    fn link_messages_are_read_for_the_attributes_used() {
        let link = parse_link(&link_message(5, &macvlan_attributes(false))).unwrap();
        assert_eq!(
            link,
            Link {
                index: 5,
                name: "vrrp.51".into(),
                alt_names: Vec::new(),
                up: true,
                framing: Framing::Ethernet,
                loopback: false,
                controller: Some(9),
                lower: Some(2),
                kind: "macvlan".into(),
                stats: None,
            }
        );
        // With IFLA_LINK_NETNSID the lower device's index is another namespace's.
        let elsewhere = parse_link(&link_message(5, &macvlan_attributes(true))).unwrap();
        assert_eq!(elsewhere.lower, None);
        // Down, loopback, no attributes.
        let mut lo = link_message(1, &[]);
        lo[2..4].copy_from_slice(&ARPHRD_LOOPBACK.to_ne_bytes());
        lo[8..12].copy_from_slice(&0u32.to_ne_bytes());
        let lo = parse_link(&lo).unwrap();
        assert!(!lo.up && lo.framing == Framing::Ethernet && lo.loopback);
        assert_eq!((lo.name.as_str(), lo.kind.as_str()), ("", ""));
        // No link-layer header (ARPHRD_NONE, a WireGuard or tun device).
        let mut none = link_message(3, &[]);
        none[2..4].copy_from_slice(&0xfffeu16.to_ne_bytes());
        assert_eq!(parse_link(&none).unwrap().framing, Framing::Ip);
        // IP-in-IP (ARPHRD_TUNNEL): not parsed.
        none[2..4].copy_from_slice(&768u16.to_ne_bytes());
        assert_eq!(parse_link(&none).unwrap().framing, Framing::Other(768));
    }

    #[test]
    fn truncated_or_corrupt_link_messages_are_errors_not_panics() {
        let whole = link_message(5, &macvlan_attributes(true));
        // Cut inside the header or an attribute: an error; cut between attributes: the
        // attributes before the cut.
        for cut in 0..whole.len() {
            let _ = parse_link(&whole[..cut]);
        }
        assert!(parse_link(&whole[..IFINFOMSG - 1]).is_err());
        assert!(parse_link(&whole[..IFINFOMSG + 6]).is_err());
        // A short IFLA_MASTER, and every byte of the message set to each of a few values.
        let mut short = Vec::new();
        netlink_dump::put_attribute(&mut short, IFLA_MASTER, &[1, 2]);
        assert!(parse_link(&link_message(5, &short)).is_err());
        for at in 0..whole.len() {
            for value in [0, 1, 3, 4, 0x7f, 0xff] {
                let mut corrupt = whole.clone();
                corrupt[at] = value;
                let _ = parse_link(&corrupt);
            }
        }
    }

    #[test]
    fn stats_messages_give_the_index_and_the_counters_exported() {
        let counters: Vec<u8> = (1..=24u64).flat_map(u64::to_ne_bytes).collect();
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(&7u32.to_ne_bytes());
        body.extend_from_slice(&1u32.to_ne_bytes());
        netlink_dump::put_attribute(&mut body, IFLA_STATS_LINK_64, &counters);
        let (index, stats) = parse_stats(&body).unwrap();
        assert_eq!(index, 7);
        assert_eq!(
            stats,
            Some(InterfaceStats {
                rx_packets: 1,
                tx_packets: 2,
                rx_bytes: 3,
                tx_bytes: 4,
                rx_errors: 5,
                tx_errors: 6,
                rx_dropped: 7,
                tx_dropped: 8,
                rx_missed: 16,
            })
        );
        // Without its 64-bit counters: none, rather than zeros.
        assert_eq!(parse_stats(&body[..IF_STATS_MSG]).unwrap(), (7, None));
        for cut in 0..body.len() {
            let _ = parse_stats(&body[..cut]);
        }
        // rtnl_link_stats64 cut short of a counter exported.
        let mut short = body[..IF_STATS_MSG].to_vec();
        netlink_dump::put_attribute(&mut short, IFLA_STATS_LINK_64, &counters[..60]);
        assert!(parse_stats(&short).is_err());
    }

    /// The hand parser against netlink-packet-route's, on every link of the namespace the
    /// test runs in (listing links needs no privileges), each message read by both.
    #[test]
    fn link_messages_read_as_netlink_packet_route_reads_them() {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        use netlink_packet_route::{
            RouteNetlinkMessage,
            link::{LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, Prop},
        };
        let mut compared = 0;
        netlink_dump::route_dump_raw(&link_request(), |kind, message| {
            if kind != RTM_NEWLINK {
                return Ok(());
            }
            let ours = parse_link(&message[HEADER..])?;
            let Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(theirs)),
                ..
            }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message)
            else {
                panic!("netlink-packet-route did not read link {}", ours.index);
            };
            let attribute =
                |pick: fn(&LinkAttribute) -> Option<u32>| theirs.attributes.iter().find_map(pick);
            let elsewhere = theirs
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
            let kind = theirs.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                }),
                _ => None,
            });
            let expected = Link {
                index: theirs.header.index,
                name: theirs
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(name) => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                alt_names: theirs
                    .attributes
                    .iter()
                    .filter_map(|a| match a {
                        LinkAttribute::PropList(properties) => Some(properties),
                        _ => None,
                    })
                    .flatten()
                    .filter_map(|property| match property {
                        Prop::AltIfName(name) => Some(name.clone()),
                        _ => None,
                    })
                    .collect(),
                up: theirs.header.flags.contains(LinkFlags::Up),
                framing: match theirs.header.link_layer_type {
                    LinkLayerType::Ether | LinkLayerType::Loopback => Framing::Ethernet,
                    LinkLayerType::None => Framing::Ip,
                    other => Framing::Other(u16::from(other)),
                },
                loopback: theirs.header.link_layer_type == LinkLayerType::Loopback,
                controller: attribute(|a| match a {
                    LinkAttribute::Controller(index) => Some(*index),
                    _ => None,
                }),
                lower: attribute(|a| match a {
                    LinkAttribute::Link(index) => Some(*index),
                    _ => None,
                })
                .filter(|&index| index != 0 && !elsewhere),
                kind: kind.unwrap_or_default(),
                stats: None,
            };
            assert_eq!(ours, expected);
            compared += 1;
            Ok(())
        })
        .unwrap();
        assert!(compared > 0, "no links listed");
    }

    /// `list` dumps the links again only after the kernel announced a change, and sees every
    /// change that matters at the next call. In a network namespace of the test's own (made
    /// by `unshare` on its thread, gone with it): needs root.
    #[test]
    fn links_are_dumped_again_only_after_an_announced_change() {
        crate::netns::in_new_namespace(|| {
            let names = |links: &[Link]| -> Vec<(String, bool)> {
                links.iter().map(|l| (l.name.clone(), l.up)).collect()
            };
            let dumps_for = |f: &dyn Fn()| {
                let before = DUMPS.get();
                f();
                DUMPS.get() - before
            };
            let listed = || list().unwrap();
            assert_eq!(
                dumps_for(&|| assert_eq!(names(&listed()), [("lo".into(), false)])),
                1
            );
            // No change: the links of the last dump, with counters read anew.
            ip("link set lo up");
            ip("link add vdump0 type veth peer name vdump1");
            listed();
            assert_eq!(
                dumps_for(&|| {
                    let links = listed();
                    assert_eq!(links, listed());
                }),
                0
            );
            let lo_packets = || listed()[0].stats.unwrap().tx_packets;
            let before = lo_packets();
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.send_to(b"x", socket.local_addr().unwrap()).unwrap();
            assert_eq!(lo_packets(), before + 1);
            // Each change is seen at the next call.
            ip("link set vdump0 up");
            assert_eq!(
                dumps_for(&|| assert!(listed().iter().any(|l| l.name == "vdump0" && l.up))),
                1
            );
            ip("link set vdump1 name vdump2");
            assert!(listed().iter().any(|l| l.name == "vdump2"));
            ip("link add br0 type bridge");
            ip("link set vdump2 master br0");
            let links = listed();
            let bridge = links.iter().find(|l| l.name == "br0").unwrap();
            let port = links.iter().find(|l| l.name == "vdump2").unwrap();
            assert_eq!(
                (bridge.kind.as_str(), port.controller),
                ("bridge", Some(bridge.index))
            );
            ip("link del vdump0");
            assert_eq!(
                names(&listed()),
                [("lo".into(), true), ("br0".into(), false)]
            );
            assert_eq!(dumps_for(&|| drop(listed())), 0);
        });
    }
}

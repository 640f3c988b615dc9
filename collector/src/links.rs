//! Network interfaces of the agent's namespace, read over rtnetlink: which ones exist, are
//! up, carry Ethernet framing that the tc classifiers parse, and their kernel counters
//! (stats64). Read on every poll: that keeps the attached set current (an interface that
//! appears is attached at the next poll) and costs one dump, tens of microseconds.

use std::io;

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
};

use crate::netlink_dump;

/// An interface as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// Ethernet or loopback framing: the tc classifiers find the IP header at offset 14.
    pub ethernet_framing: bool,
    pub loopback: bool,
    /// Index of the device this one is enslaved to (`IFLA_MASTER`), if any.
    pub controller: Option<u32>,
    /// Index of the device this one sends and receives through (`IFLA_LINK`: a macvlan's
    /// or a VLAN's lower device, a veth's peer), when that device is in this namespace.
    pub lower: Option<u32>,
    /// The device's kind (`IFLA_INFO_KIND`: "bond", "bridge", "vlan", ...); empty for a
    /// physical one.
    pub kind: String,
    /// The kernel's counters for the interface (`IFLA_STATS64`).
    pub stats: InterfaceStats,
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

/// An interface's own counters, as `ip -s link` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Every interface in the current network namespace.
pub fn list() -> io::Result<Vec<Link>> {
    netlink_dump::retry_interrupted(|| {
        let mut links = Vec::new();
        netlink_dump::route_dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            |message| {
                if let RouteNetlinkMessage::NewLink(link) = message {
                    links.push(from_message(&link));
                }
            },
        )?;
        Ok(links)
    })
}

fn from_message(message: &LinkMessage) -> Link {
    let name = message
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let stats = message
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::Stats64(s) => Some(InterfaceStats {
                rx_bytes: s.rx_bytes,
                rx_packets: s.rx_packets,
                rx_errors: s.rx_errors,
                rx_dropped: s.rx_dropped,
                tx_bytes: s.tx_bytes,
                tx_packets: s.tx_packets,
                tx_errors: s.tx_errors,
                tx_dropped: s.tx_dropped,
            }),
            _ => None,
        })
        .unwrap_or_default();
    let controller = message.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    });
    // With IFLA_LINK_NETNSID the index is another namespace's.
    let lower_elsewhere = message
        .attributes
        .iter()
        .any(|attr| matches!(attr, LinkAttribute::LinkNetNsId(_)));
    let lower = message.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::Link(index) if !lower_elsewhere && *index != 0 => Some(*index),
        _ => None,
    });
    let kind = message
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default();
    Link {
        index: message.header.index,
        name,
        up: message.header.flags.contains(LinkFlags::Up),
        ethernet_framing: matches!(
            message.header.link_layer_type,
            LinkLayerType::Ether | LinkLayerType::Loopback
        ),
        loopback: message.header.link_layer_type == LinkLayerType::Loopback,
        controller,
        lower,
        kind,
        stats,
    }
}

/// Whether `link` is watched when no interfaces are configured: up, with Ethernet framing,
/// not the port of a bond, bridge, team or Open vSwitch, whose packets the controller's
/// own device sees again (counting both would count them twice; a VRF's ports stay, as the
/// VRF device's hooks do not see their packets), and not a macvlan whose lower device is
/// watched, which sees its packets too.
pub fn watched_by_default(link: &Link, all: &[Link]) -> bool {
    let upper_of_watched = UPPER_DEVICES.contains(&link.kind.as_str())
        && link.lower.is_some_and(|index| {
            all.iter()
                .any(|other| other.index == index && countable_on_its_own(other, all))
        });
    countable_on_its_own(link, all) && !upper_of_watched
}

/// Up, with Ethernet framing, and not the port of a layer-2 controller.
fn countable_on_its_own(link: &Link, all: &[Link]) -> bool {
    let port_of_layer2_controller = link.controller.is_some_and(|index| {
        all.iter()
            .any(|other| other.index == index && LAYER2_CONTROLLERS.contains(&other.kind.as_str()))
    });
    link.up && link.ethernet_framing && !port_of_layer2_controller
}

/// The links to attach to at start, and the configured names not there yet.
#[derive(Debug)]
pub struct Selection<'a> {
    pub links: Vec<&'a Link>,
    /// Configured names with no interface of this namespace: attached when they appear.
    pub missing: Vec<String>,
}

/// The links to attach to: the configured names that exist (each with Ethernet framing),
/// the others left to appear later, or with none configured those [`watched_by_default`],
/// loopback included.
pub fn selection<'a>(links: &'a [Link], configured: &[String]) -> Result<Selection<'a>, String> {
    if configured.is_empty() {
        return Ok(Selection {
            links: links
                .iter()
                .filter(|l| watched_by_default(l, links))
                .collect(),
            missing: Vec::new(),
        });
    }
    let mut selected = Selection {
        links: Vec::new(),
        missing: Vec::new(),
    };
    for name in configured {
        match links.iter().find(|l| &l.name == name) {
            None => selected.missing.push(name.clone()),
            Some(link) if link.ethernet_framing => selected.links.push(link),
            Some(_) => {
                return Err(format!(
                    "interface {name} has no Ethernet framing; the tc classifiers only parse Ethernet and loopback"
                ));
            }
        }
    }
    Ok(selected)
}

/// The configured names that no interface with Ethernet framing has (yet): not attached.
pub fn missing(links: &[Link], configured: &[String]) -> Vec<String> {
    configured
        .iter()
        .filter(|name| !links.iter().any(|l| &&l.name == name && l.ethernet_framing))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, up: bool, ethernet_framing: bool) -> Link {
        Link {
            index,
            name: name.into(),
            up,
            ethernet_framing,
            loopback: name == "lo",
            controller: None,
            lower: None,
            kind: String::new(),
            stats: InterfaceStats::default(),
        }
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
        let names: Vec<_> = selection(&links, &[])
            .unwrap()
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["lo", "bond0", "br0", "vrf-blue", "eth2", "bond0.100"]
        );
        // Configured by name, a port is attached as asked.
        assert_eq!(
            selection(&links, &["eth0".into()]).unwrap().links[0].name,
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
        let names: Vec<_> = selection(&links, &[])
            .unwrap()
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        // mv1's lower device is down, and so not watched: mv1 counts its own packets.
        assert_eq!(names, ["lo", "eth0", "mv1", "eth0.7"]);
    }

    #[test]
    fn default_selection_is_every_up_ethernet_link() {
        let links = [
            link(1, "lo", true, true),
            link(2, "eth0", true, true),
            link(3, "eth1", false, true),
            link(4, "wg0", true, false),
        ];
        let names: Vec<_> = selection(&links, &[])
            .unwrap()
            .links
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["lo", "eth0"]);
    }

    #[test]
    fn configured_links_must_be_ethernet_and_may_come_later() {
        let links = [link(1, "lo", true, true), link(4, "wg0", true, false)];
        assert_eq!(selection(&links, &["lo".into()]).unwrap().links.len(), 1);
        let selected = selection(&links, &["eth9".into(), "lo".into()]).unwrap();
        assert_eq!(selected.links.len(), 1);
        assert_eq!(selected.missing, ["eth9"]);
        assert!(
            selection(&links, &["wg0".into()])
                .map(|s| s.links)
                .unwrap_err()
                .contains("no Ethernet framing")
        );
        assert_eq!(
            missing(&links, &["lo".into(), "wg0".into(), "eth9".into()]),
            ["wg0", "eth9"]
        );
    }
}

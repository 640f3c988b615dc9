//! Network interfaces of the agent's namespace, read over rtnetlink: which ones exist, are
//! up, carry Ethernet framing that the tc classifiers parse, and their kernel counters
//! (stats64). Read on every poll: that keeps the attached set current (an interface that
//! appears is attached at the next poll) and costs one dump, tens of microseconds.

use std::io;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An interface as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    /// Ethernet or loopback framing: the tc classifiers find the IP header at offset 14.
    pub ethernet_framing: bool,
    pub loopback: bool,
    /// The kernel's counters for the interface (`IFLA_STATS64`).
    pub stats: InterfaceStats,
}

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
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut links = Vec::new();
    let mut receive = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&receive[offset..size])
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::Error(err) => {
                    return Err(err.to_io());
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    links.push(from_message(&link));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
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
    Link {
        index: message.header.index,
        name,
        up: message.header.flags.contains(LinkFlags::Up),
        ethernet_framing: matches!(
            message.header.link_layer_type,
            LinkLayerType::Ether | LinkLayerType::Loopback
        ),
        loopback: message.header.link_layer_type == LinkLayerType::Loopback,
        stats,
    }
}

/// The links to attach to: the configured names (each must exist), or with none configured
/// every up link with Ethernet framing, loopback included.
pub fn select<'a>(links: &'a [Link], configured: &[String]) -> Result<Vec<&'a Link>, String> {
    if configured.is_empty() {
        return Ok(links
            .iter()
            .filter(|l| l.up && l.ethernet_framing)
            .collect());
    }
    configured
        .iter()
        .map(|name| {
            let link = links
                .iter()
                .find(|l| &l.name == name)
                .ok_or_else(|| format!("interface {name} does not exist in this network namespace"))?;
            if link.ethernet_framing {
                Ok(link)
            } else {
                Err(format!(
                    "interface {name} has no Ethernet framing; the tc classifiers only parse Ethernet and loopback"
                ))
            }
        })
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
            stats: InterfaceStats::default(),
        }
    }

    #[test]
    fn default_selection_is_every_up_ethernet_link() {
        let links = [
            link(1, "lo", true, true),
            link(2, "eth0", true, true),
            link(3, "eth1", false, true),
            link(4, "wg0", true, false),
        ];
        let names: Vec<_> = select(&links, &[])
            .unwrap()
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["lo", "eth0"]);
    }

    #[test]
    fn configured_links_must_exist_and_be_ethernet() {
        let links = [link(1, "lo", true, true), link(4, "wg0", true, false)];
        assert_eq!(select(&links, &["lo".into()]).unwrap().len(), 1);
        assert!(
            select(&links, &["eth9".into()])
                .unwrap_err()
                .contains("eth9 does not exist")
        );
        assert!(
            select(&links, &["wg0".into()])
                .unwrap_err()
                .contains("no Ethernet framing")
        );
    }
}

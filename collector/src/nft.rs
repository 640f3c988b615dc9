//! nftables: the agent's own table (default `inet collector`) with a named counter per
//! watched port and direction, next to the eBPF figures so that a gap between the two shows.
//!
//! - `in`: a prerouting chain (priority -301, before raw, conntrack and NAT) counts packets whose
//!   destination port is a route's TCP port or a DNS UDP port and whose destination address
//!   is the namespace's; sent on by NAT to another host, they never reach a local socket.
//! - `out`: a postrouting chain (priority 300, after source NAT at 100) counts packets whose
//!   source port is one and whose source address is the namespace's. Behind DNAT or
//!   REDIRECT a reply's source is the backend's until source NAT puts the address it was
//!   sent to back: before it, `out` read 0.
//!
//! Both count ports and addresses as on the wire, and only the host's packets, as the tc
//! classifiers do (a node's forwarded pod traffic is neither's), `extra_local_addresses`
//! included (a set per family); by port alone with `all_namespaces`, where the classifiers
//! count by port, or past [`EXTRA_RANGES_IN_SETS_MAX`] extra entries ([`RuleForm::of`]).
//! The table is made and removed with `nft -j`, within a deadline ([`crate::nft_tool`]);
//! its counters are read over nfnetlink ([`crate::nfnetlink`]), which costs far less than
//! a `nft -j list` process (see docs/DESIGN.md).
//!
//! Only a table that is recognisably ours is ever adopted, replaced or deleted
//! ([`judge`]): one holding nothing but our chains, their rules, our maps and sets and
//! counters named as ours are, the counters without a comment (an earlier build's) or
//! with [`COMMENT`]. Any other table of that name (a host firewall's `inet filter`, say)
//! is left as it is and the source is down, naming it. A start finds a leftover table of a
//! crashed run: if it is exactly what this config plans (chains, hooks, priorities, rules,
//! map and set elements, counters), it is adopted as it is, so its counts continue; otherwise it is replaced
//! (deleted by handle and made again in one transaction): never two tables, never doubled
//! rules. The table's name is claimed first ([`crate::nft_claim`]): a second collector of
//! this namespace configured with the same name leaves the first one's table alone.
//!
//! Each poll reads the ruleset's generation; when it moved, the table is read whole again
//! and a table changed in any way that stops or skews its counting (its rules flushed, a
//! chain or map element gone, made dormant) is made again, as a table removed is.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use serde_json::json;

use crate::{
    config::{Config, NftEnabled},
    nfnetlink::{self, TableContents},
    nft_claim::{self, Holder, TableClaim},
    nft_continuity::{Continuity, Counts},
    nft_tool, poller,
    snapshot::SourceHealth,
};

/// Chain and map names inside our table.
const IN_CHAIN: &str = "count_in";
const OUT_CHAIN: &str = "count_out";
const IN_MAP: &str = "ports_in";
const OUT_MAP: &str = "ports_out";
/// The regular chains the packets on a watched port jump to where `extra_local_addresses`
/// are counted too.
const IN_CHECKED: &str = "checked_in";
const OUT_CHECKED: &str = "checked_out";

/// The comment our counters carry: who made the table, for whoever lists the ruleset. (A
/// table's own comment is not in nft 1.0.6's JSON; a counter's is.) Kept as it is across
/// builds: a start replaces a table whose counters carry another.
pub const COMMENT: &str = "made by collector (the ingress metrics agent), removed at its stop";

/// One chain of ours: where it hooks and which port of the packet it looks up.
struct Direction {
    inbound: bool,
    chain: &'static str,
    /// The chain its packets on a watched port jump to where extra addresses are counted.
    checked: &'static str,
    hook: &'static str,
    hook_number: u32,
    /// `in`: -301, before conntrack (-200) and destination NAT (-100), so the destination
    /// port is as the packet arrived, and before every `raw` chain (-300, iptables' too): of
    /// two chains at one priority the kernel runs the one registered last first, so at -300
    /// a firewall's raw drop counted in ours or not by which table was made last.
    /// `out`: 300, after source NAT (100), which also puts back the source of a reply to a
    /// destination-NATed connection, so the source port is as the packet leaves.
    priority: i32,
    map: &'static str,
    field: &'static str,
    /// The field's offset in the transport header.
    offset: u32,
    /// The address that must be one of the namespace's for the packet to count (`fib
    /// daddr type local`: to it, `saddr`: from it), as the tc classifiers count only
    /// packets to or from `LOCAL_ADDRESSES`; and its `fib` flag.
    address: &'static str,
    fib_flag: u32,
}

const DIRECTIONS: [Direction; 2] = [
    Direction {
        inbound: true,
        chain: IN_CHAIN,
        checked: IN_CHECKED,
        hook: "prerouting",
        hook_number: NF_INET_PRE_ROUTING,
        priority: -301,
        map: IN_MAP,
        field: "dport",
        offset: 2,
        address: "daddr",
        fib_flag: nfnetlink::NFTA_FIB_F_DADDR,
    },
    Direction {
        inbound: false,
        chain: OUT_CHAIN,
        checked: OUT_CHECKED,
        hook: "postrouting",
        hook_number: NF_INET_POST_ROUTING,
        priority: 300,
        map: OUT_MAP,
        field: "sport",
        offset: 0,
        address: "saddr",
        fib_flag: nfnetlink::NFTA_FIB_F_SADDR,
    },
];

/// `NF_ACCEPT`, a base chain's policy.
const NF_ACCEPT: u32 = 1;

/// An IP family, as our table checks packets to or from its `extra_local_addresses`.
#[derive(Debug)]
struct Family {
    name: &'static str,
    /// The set of the family's extra addresses (ranges), and its nft type.
    set: &'static str,
    nft_type: &'static str,
    /// What nft names the family's header by (`ip daddr`), and its `meta nfproto`.
    protocol: &'static str,
    nfproto: u8,
    /// The length of an address, and the offsets of the destination and the source in the
    /// network header.
    address_len: u32,
    daddr_offset: u32,
    saddr_offset: u32,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "IPv4",
        set: "extra_ipv4",
        nft_type: "ipv4_addr",
        protocol: "ip",
        nfproto: 2,
        address_len: 4,
        daddr_offset: 16,
        saddr_offset: 12,
    },
    Family {
        name: "IPv6",
        set: "extra_ipv6",
        nft_type: "ipv6_addr",
        protocol: "ip6",
        nfproto: 10,
        address_len: 16,
        daddr_offset: 24,
        saddr_offset: 8,
    },
];

impl Family {
    /// The offset of the address `direction` checks.
    fn offset(&self, direction: &Direction) -> u32 {
        if direction.inbound {
            self.daddr_offset
        } else {
            self.saddr_offset
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// Its IP protocol number.
    fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// One named counter of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCounter {
    /// `tcp_443_in`, `udp_53_out`: by port, so that any route name is safe.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `true` for `in` (destination port), `false` for `out` (source port).
    pub inbound: bool,
    /// The route owning the port, or `dns`: the `route` label (not `service`, which
    /// Kubernetes service discovery puts on every target of a `ServiceMonitor`).
    pub route: String,
}

/// The counters a config wants: every route port (TCP) and DNS port (UDP), each way. A port
/// shared by server name is its route's without names (packets carry no name).
#[must_use]
pub fn plan(config: &Config) -> Vec<PlannedCounter> {
    let mut wanted: Vec<(Protocol, u16, String)> = config
        .routes
        .iter()
        .filter(|route| route.sni.is_empty())
        .flat_map(|route| {
            route
                .ports
                .iter()
                .map(|&port| (Protocol::Tcp, port, route.name.clone()))
        })
        .collect();
    if config.dns.enabled {
        wanted.extend(
            config
                .dns
                .ports
                .iter()
                .map(|&port| (Protocol::Udp, port, "dns".to_owned())),
        );
    }
    wanted
        .into_iter()
        .flat_map(|(protocol, port, route)| {
            [true, false].map(|inbound| PlannedCounter {
                name: format!(
                    "{}_{port}_{}",
                    protocol.as_str(),
                    if inbound { "in" } else { "out" }
                ),
                protocol,
                port,
                inbound,
                route: route.clone(),
            })
        })
        .collect()
}

/// Whether nftables counting is on, off or up to `auto`: the config's `[nftables] enabled`,
/// but off where the config has nothing for it to count (no route port, DNS off), since an
/// empty table's chains would still hook every packet.
#[must_use]
pub fn mode(config: &Config) -> NftEnabled {
    if plan(config).is_empty() {
        NftEnabled::Off
    } else {
        config.nftables.enabled
    }
}

/// What `collector run` and `check` say when [`mode`] turns counting off against the config.
pub const NOTHING_TO_COUNT: &str =
    "nothing to count: no [[routes]] port without server names, and [dns] enabled = false";

/// A counter's value as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterValue {
    pub counter: PlannedCounter,
    pub packets: u64,
    pub bytes: u64,
}

/// Why the nftables source is not available; the rest of the agent carries on.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Tool(#[from] nft_tool::ToolError),
    #[error("reading nftables over nfnetlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error(
        "our nftables table inet {table} {what} (nft flush ruleset or flush table, a firewall reload?): it is made again where counting is still wanted"
    )]
    Removed { table: String, what: String },
    #[error(
        "the nftables table inet {table} is not the collector's: it {why}; it is left as it is: give the collector a table of its own ([nftables] table = \"...\"; the default is \"collector\")"
    )]
    NotOurs { table: String, why: String },
    #[error(
        "left the nftables table inet {table}: it is no longer the one the collector made (it {why}), and its chains may still hook every packet; `nft delete table inet {table}` removes it once nobody needs what was added"
    )]
    LeftChanged { table: String, why: String },
    #[error(
        "the nftables table inet {table} is another running collector's in this network namespace ({holder}): give this one a table of its own ([nftables] table = \"...\") or set [nftables] enabled = false; it is looked at again now and then"
    )]
    InUse { table: String, holder: Holder },
    #[error("claiming the nftables table's name: {0}")]
    Claim(std::io::Error),
    #[error(
        "{version} made our table without its counters' comments, which tell the collector's \
         table from an earlier build's (nft keeps them from 1.0.6 on): {}, and none is made \
         until a restart, where each would be replaced at the next read; install nftables \
         1.0.6 or later, or set [nftables] enabled = false",
        removed.as_ref().map_or_else(String::as_str, |()| "it was removed")
    )]
    ToolTooOld {
        version: String,
        /// Whether the table made was removed, or why not.
        removed: Result<(), String>,
    },
    #[error(
        "a try at making the nftables table, or at removing what is left of it, failed: its thread panicked"
    )]
    MakingPanicked,
}

/// What a table of our name is, against a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Absent,
    /// Ours and exactly as planned: adopted as it is.
    AsPlanned,
    /// Ours, but not as planned (the words after "the table"): replaced.
    Differs(String),
    /// Not recognisably ours (the words after "it"): left alone.
    NotOurs(String),
}

/// What the table `contents` (`None`: there is none) is, for a config planning `plan`
/// counted by `rule`.
#[must_use]
pub fn judge(
    plan: &[PlannedCounter],
    rule: &RuleForm,
    contents: Option<&TableContents>,
) -> Verdict {
    let Some(contents) = contents else {
        return Verdict::Absent;
    };
    if let Some(why) = not_ours(contents) {
        return Verdict::NotOurs(why);
    }
    match difference(plan, rule, contents) {
        Some(why) => Verdict::Differs(why),
        None => Verdict::AsPlanned,
    }
}

/// A counter name as ours are made: `tcp_443_in`, `udp_53_out`.
fn is_our_counter_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("tcp_")
        .or_else(|| name.strip_prefix("udp_"))
    else {
        return false;
    };
    let Some(port) = rest
        .strip_suffix("_in")
        .or_else(|| rest.strip_suffix("_out"))
    else {
        return false;
    };
    port.parse::<u16>()
        .is_ok_and(|port_number| port_number.to_string() == port)
}

/// The rules a table of ours holds in each chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleForm {
    /// The packet's protocol and port looked up in the direction's map, then its address
    /// checked to be the namespace's (`fib ... type local`), then counted in the counter the
    /// element names: the host's packets, as the tc classifiers count them. With
    /// `extra_local_addresses` (a VIP kube-proxy DNATs to a hostNetwork proxy, which the
    /// classifiers take for the host's too), a packet on a watched port jumps to a chain of
    /// its own instead, which counts it and returns if its address is local, and counts it
    /// if its address is in the family's set of extra addresses: a packet on no watched port
    /// costs one look-up, as without.
    HostsPackets { extra: ExtraAddresses },
    /// The look-up to the counter alone: by port, packets the host forwards included. Every
    /// build's up to 2ca4b1a, and this one's with `all_namespaces`, where the classifiers
    /// count by port alone, or past [`EXTRA_RANGES_IN_SETS_MAX`] extra entries.
    PortAlone,
}

impl RuleForm {
    /// The rules `config` wants: the host's packets (and its extra addresses'), but with
    /// `all_namespaces`, whose classifiers count every namespace's packets by port alone: by
    /// port alone there too, so that nftables does not read below eBPF (a `local` route of
    /// another routing table still does: docs/DESIGN.md, nftables). By port alone as well
    /// past [`EXTRA_RANGES_IN_SETS_MAX`] extra addresses.
    #[must_use]
    pub fn of(config: &Config) -> Self {
        if config.all_namespaces || config.extra_local_addresses.len() > EXTRA_RANGES_IN_SETS_MAX {
            Self::PortAlone
        } else {
            Self::HostsPackets {
                extra: ExtraAddresses::of(config),
            }
        }
    }

    /// The rules of a direction, in order: its base chain's, then its checked chain's.
    fn rules(&self) -> Vec<OurRule> {
        match self {
            Self::PortAlone => vec![OurRule::PortAlone],
            Self::HostsPackets { extra } if extra.families().next().is_none() => {
                vec![OurRule::HostsPackets]
            }
            Self::HostsPackets { extra } => [OurRule::JumpToChecked, OurRule::CheckedHost]
                .into_iter()
                .chain(
                    extra
                        .families()
                        .map(|(family, _)| OurRule::CheckedExtra(family)),
                )
                .collect(),
        }
    }

    /// Whether the directions have checked chains.
    fn checks_in_chains(&self) -> bool {
        self.rules().contains(&OurRule::JumpToChecked)
    }
}

/// Most `extra_local_addresses` entries our table holds in its sets; past them it counts by
/// port alone (a warning at the start and from `check`). At the config's limit (262,144
/// single addresses) `nft` took 1.6 s and 203 MB to make the set here, near the
/// `DaemonSet`'s 256 MiB memory limit, and the set would be read whole at every change of
/// the ruleset; 1,024 ranges are some 2,000 elements.
pub const EXTRA_RANGES_IN_SETS_MAX: usize = 1024;

/// `extra_local_addresses` as our table holds them, per family of [`FAMILIES`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraAddresses([FamilyRanges; 2]);

/// The extra addresses of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FamilyRanges {
    /// (network address, prefix length), IPv4-mapped IPv6 ones as IPv4, as packets carry
    /// them.
    ranges: Vec<(IpAddr, u8)>,
    /// The set's elements as the kernel holds them ([`interval_elements`]), worked out once:
    /// the table is judged again at each change of the ruleset.
    elements: Vec<(Vec<u8>, bool)>,
}

impl ExtraAddresses {
    fn of(config: &Config) -> Self {
        let mut families: [Vec<(IpAddr, u8)>; 2] = Default::default();
        for &(address, prefix) in &config.extra_local_addresses {
            // The config takes at most 65,536 addresses an entry: a mapped IPv6 range lies
            // wholly within ::ffff:0:0/96.
            let mapped = match address {
                IpAddr::V6(v6) if prefix >= 96 => v6.to_ipv4_mapped(),
                _ => None,
            };
            match (address, mapped) {
                (_, Some(v4)) => families[0].push((IpAddr::V4(v4), prefix - 96)),
                (IpAddr::V4(_), None) => families[0].push((address, prefix)),
                (IpAddr::V6(_), None) => families[1].push((address, prefix)),
            }
        }
        Self(families.map(|ranges| FamilyRanges {
            elements: interval_elements(&ranges),
            ranges,
        }))
    }

    /// The families with extra addresses (index in [`FAMILIES`]), with their ranges.
    fn families(&self) -> impl Iterator<Item = (usize, &FamilyRanges)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, family)| !family.ranges.is_empty())
    }
}

/// The elements of an interval set of `ranges` as the kernel holds them (key, whether it
/// ends a range): each range's first address, and the address after its last as the end
/// (none past the family's last address). nft adds an end at address 0 as well, which
/// [`set_difference`] passes over.
fn interval_elements(ranges: &[(IpAddr, u8)]) -> Vec<(Vec<u8>, bool)> {
    let mut elements = Vec::new();
    for &(address, prefix) in ranges {
        let (first, bits) = match address {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let bytes = |value: u128| value.to_be_bytes()[16 - bits as usize / 8..].to_vec();
        elements.push((bytes(first), false));
        let end = first
            .checked_add(1 << (bits - u32::from(prefix)))
            .filter(|&end| bits == 128 || end < 1 << 32);
        if let Some(end) = end {
            elements.push((bytes(end), true));
        }
    }
    elements.sort_unstable();
    elements
}

/// One rule of ours, as read back from a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OurRule {
    PortAlone,
    HostsPackets,
    /// A packet on a watched port to the checked chain.
    JumpToChecked,
    /// In the checked chain: to or from a local address, counted, and back.
    CheckedHost,
    /// In the checked chain: to or from an extra address of the family (index in
    /// [`FAMILIES`]), counted.
    CheckedExtra(usize),
}

/// What a direction's `rules` count, in words; `None` for rules of ours that no config
/// makes together (none, a rule twice).
fn describe(rules: &[OurRule]) -> Option<String> {
    match rules {
        [OurRule::PortAlone] => Some("by port alone".to_owned()),
        [OurRule::HostsPackets] => Some("the host's packets alone".to_owned()),
        [OurRule::JumpToChecked, OurRule::CheckedHost, extra @ ..] if !extra.is_empty() => {
            let families: Option<Vec<usize>> = extra
                .iter()
                .map(|rule| match rule {
                    OurRule::CheckedExtra(family) => Some(*family),
                    _ => None,
                })
                .collect();
            let families = families.filter(|f| f.windows(2).all(|pair| pair[0] < pair[1]))?;
            let names: Vec<&str> = families.iter().map(|&f| FAMILIES[f].name).collect();
            Some(format!(
                "the host's packets and its extra {} addresses",
                names.join(" and ")
            ))
        }
        _ => None,
    }
}

/// Which of our rules of `direction` `rule` is, if it is one.
fn our_rule_form(rule: &nfnetlink::Rule, direction: &Direction) -> Option<OurRule> {
    let watched = |meta, payload, lookup| {
        is_port_key(meta, payload, direction) && is_set_lookup(lookup, direction.map)
    };
    let counted = |meta, payload, objref| {
        is_port_key(meta, payload, direction) && is_counter_lookup(objref, direction)
    };
    let expressions = rule.expressions.as_slice();
    if rule.chain == direction.checked {
        return match expressions {
            [fib, cmp, meta, payload, objref, back] => (is_fib_local(fib, cmp, direction)
                && counted(meta, payload, objref)
                && is_verdict(back, nfnetlink::NFT_RETURN, None))
            .then_some(OurRule::CheckedHost),
            [nfproto, is_family, address, in_set, meta, payload, objref] => FAMILIES
                .iter()
                .position(|family| {
                    is_extra_address(&[nfproto, is_family, address, in_set], family, direction)
                })
                .filter(|_| counted(meta, payload, objref))
                .map(OurRule::CheckedExtra),
            _ => None,
        };
    }
    if rule.chain != direction.chain {
        return None;
    }
    match expressions {
        [meta, payload, objref] => counted(meta, payload, objref).then_some(OurRule::PortAlone),
        [
            meta,
            payload,
            lookup,
            fib,
            cmp,
            counter_meta,
            counter_payload,
            objref,
        ] => (watched(meta, payload, lookup)
            && is_fib_local(fib, cmp, direction)
            && counted(counter_meta, counter_payload, objref))
        .then_some(OurRule::HostsPackets),
        [meta, payload, lookup, jump] => (watched(meta, payload, lookup)
            && is_verdict(jump, nfnetlink::NFT_JUMP, Some(direction.checked)))
        .then_some(OurRule::JumpToChecked),
        _ => None,
    }
}

/// Whether `immediate` gives the verdict `code` (to `chain`, for a jump).
fn is_verdict(immediate: &nfnetlink::Expression, code: i32, chain: Option<&str>) -> bool {
    immediate.name == "immediate"
        && immediate.be32(nfnetlink::NFTA_IMMEDIATE_DREG) == Some(0)
        && immediate
            .verdict(nfnetlink::NFTA_IMMEDIATE_DATA)
            .is_some_and(|(given, to)| given == code && to.as_deref() == chain)
}

/// Whether `lookup` matches the packet in `set`, as a condition (no data register, not
/// inverted).
fn is_set_lookup(lookup: &nfnetlink::Expression, set: &str) -> bool {
    lookup.name == "lookup"
        && lookup.text(nfnetlink::NFTA_LOOKUP_SET).as_deref() == Some(set)
        && lookup.be32(nfnetlink::NFTA_LOOKUP_DREG).is_none()
        && lookup.be32(nfnetlink::NFTA_LOOKUP_FLAGS).unwrap_or(0) == 0
}

/// Whether `fib` and `cmp` check that `direction`'s address is the namespace's.
fn is_fib_local(
    fib: &nfnetlink::Expression,
    cmp: &nfnetlink::Expression,
    direction: &Direction,
) -> bool {
    fib.name == "fib"
        && fib.be32(nfnetlink::NFTA_FIB_RESULT) == Some(nfnetlink::NFT_FIB_RESULT_ADDRTYPE)
        && fib.be32(nfnetlink::NFTA_FIB_FLAGS) == Some(direction.fib_flag)
        && fib.be32(nfnetlink::NFTA_FIB_DREG).is_some()
        && cmp.name == "cmp"
        && cmp.be32(nfnetlink::NFTA_CMP_SREG) == fib.be32(nfnetlink::NFTA_FIB_DREG)
        && cmp.be32(nfnetlink::NFTA_CMP_OP) == Some(nfnetlink::NFT_CMP_EQ)
        && cmp.data_value(nfnetlink::NFTA_CMP_DATA) == Some(&nfnetlink::RTN_LOCAL.to_ne_bytes()[..])
}

/// Whether `nfproto`, `is_family`, `address` and `in_set` check that the packet is of
/// `family` and that `direction`'s address is in the family's set (`ip daddr @extra_ipv4`).
fn is_extra_address(
    [nfproto, is_family, address, in_set]: &[&nfnetlink::Expression; 4],
    family: &Family,
    direction: &Direction,
) -> bool {
    nfproto.name == "meta"
        && nfproto.be32(nfnetlink::NFTA_META_KEY) == Some(nfnetlink::NFT_META_NFPROTO)
        && is_family.name == "cmp"
        && is_family.be32(nfnetlink::NFTA_CMP_OP) == Some(nfnetlink::NFT_CMP_EQ)
        && is_family.data_value(nfnetlink::NFTA_CMP_DATA) == Some(&[family.nfproto][..])
        && address.name == "payload"
        && address.be32(nfnetlink::NFTA_PAYLOAD_BASE) == Some(nfnetlink::NFT_PAYLOAD_NETWORK_HEADER)
        && address.be32(nfnetlink::NFTA_PAYLOAD_OFFSET) == Some(family.offset(direction))
        && address.be32(nfnetlink::NFTA_PAYLOAD_LEN) == Some(family.address_len)
        && is_set_lookup(in_set, family.set)
}

/// Whether `meta` and `payload` load the packet's protocol and `direction`'s port.
fn is_port_key(
    meta: &nfnetlink::Expression,
    payload: &nfnetlink::Expression,
    direction: &Direction,
) -> bool {
    meta.name == "meta"
        && meta.be32(nfnetlink::NFTA_META_KEY) == Some(nfnetlink::NFT_META_L4PROTO)
        && payload.name == "payload"
        && payload.be32(nfnetlink::NFTA_PAYLOAD_BASE)
            == Some(nfnetlink::NFT_PAYLOAD_TRANSPORT_HEADER)
        && payload.be32(nfnetlink::NFTA_PAYLOAD_OFFSET) == Some(direction.offset)
        && payload.be32(nfnetlink::NFTA_PAYLOAD_LEN) == Some(2)
}

/// Whether `objref` counts in the counter `direction`'s map names.
fn is_counter_lookup(objref: &nfnetlink::Expression, direction: &Direction) -> bool {
    objref.name == "objref"
        && objref.text(nfnetlink::NFTA_OBJREF_SET_NAME).as_deref() == Some(direction.map)
}

/// The direction whose base or checked chain `chain` is.
fn direction_of_chain(chain: &str) -> Option<&'static Direction> {
    DIRECTIONS
        .iter()
        .find(|d| d.chain == chain || d.checked == chain)
}

/// Why `contents` is not recognisably a table the collector made, if it is not. Ours holds
/// our chains (with our rules, or none), our maps and sets and counters named as ours are, the
/// counters with no comment (a build before they had one) or ours; and nothing else, not
/// even a comment on the table. A table holding none of that is not ours either: nothing in
/// it says so.
fn not_ours(contents: &TableContents) -> Option<String> {
    // nft 1.1.6 and later stamp every table they make with their version and build time
    // (user data records 1 and 2), ours included: only a comment says someone else's.
    if let Some(userdata) = &contents.userdata {
        if let Some(comment) = nfnetlink::comment(userdata) {
            return Some(format!("has a comment of its own ({comment:?})"));
        }
        if nfnetlink::userdata_records(userdata).is_none() {
            return Some("carries user data nft never writes".to_owned());
        }
    }
    for chain in &contents.chains {
        if direction_of_chain(&chain.name).is_none() {
            return Some(format!("holds the chain {}", chain.name));
        }
    }
    for rule in &contents.rules {
        if direction_of_chain(&rule.chain)
            .and_then(|d| our_rule_form(rule, d))
            .is_none()
        {
            let what: Vec<&str> = rule.expressions.iter().map(|e| e.name.as_str()).collect();
            return Some(format!(
                "holds a rule in {} that is not the collector's ({})",
                rule.chain,
                what.join(" ")
            ));
        }
    }
    for set in &contents.sets {
        // By name and type: a set of another type under one of our names is someone else's.
        let our_map = DIRECTIONS.iter().any(|d| d.map == set.name)
            && set.object_type == Some(nfnetlink::NFT_OBJECT_COUNTER);
        let our_set = FAMILIES.iter().any(|f| {
            f.set == set.name && f.address_len == set.key_len && set.object_type.is_none()
        });
        if !our_map && !our_set {
            return Some(format!("holds the set or map {}", set.name));
        }
    }
    for object in &contents.objects {
        if object.kind != nfnetlink::NFT_OBJECT_COUNTER || !is_our_counter_name(&object.name) {
            return Some(format!("holds the object {}", object.name));
        }
        if let Some(comment) = object.comment.as_deref().filter(|&c| c != COMMENT) {
            return Some(format!(
                "holds the counter {} with the comment {comment:?}",
                object.name
            ));
        }
    }
    let listed = contents.chains.len() + contents.sets.len() + contents.objects.len();
    if usize::try_from(contents.use_count).is_ok_and(|count| count > listed) {
        return Some("holds a flowtable or another object the collector never makes".to_owned());
    }
    if listed == 0 {
        return Some("is empty, and nothing in it says it is the collector's".to_owned());
    }
    None
}

/// How our table `contents` differs from what `plan` wants made, if it does: the first
/// difference found.
fn difference(
    plan: &[PlannedCounter],
    rule: &RuleForm,
    contents: &TableContents,
) -> Option<String> {
    if contents.flags != 0 {
        return Some(format!(
            "has flags {:#x} (dormant: its chains hook nothing)",
            contents.flags
        ));
    }
    let mut wanted: Vec<&str> = plan.iter().map(|c| c.name.as_str()).collect();
    wanted.sort_unstable();
    let mut counters: Vec<&str> = contents.objects.iter().map(|o| o.name.as_str()).collect();
    counters.sort_unstable();
    if counters != wanted {
        return Some(format!(
            "holds the counters [{}] where the config wants [{}]",
            counters.join(", "),
            wanted.join(", ")
        ));
    }
    if let Some(object) = contents.objects.iter().find(|o| o.comment.is_none()) {
        return Some(format!(
            "was made by an earlier build (its counter {} has no comment)",
            object.name
        ));
    }
    let wanted = rule.rules();
    for direction in &DIRECTIONS {
        if let Some(why) = chain_difference(plan, &wanted, contents, direction) {
            return Some(why);
        }
    }
    let chains = DIRECTIONS.len() * if rule.checks_in_chains() { 2 } else { 1 };
    if contents.chains.len() != chains {
        return Some(format!(
            "holds {} chains where the config wants {chains}",
            contents.chains.len(),
        ));
    }
    let extra = match rule {
        RuleForm::HostsPackets { extra } => extra.families().collect(),
        RuleForm::PortAlone => Vec::new(),
    };
    if contents.sets.len() != DIRECTIONS.len() + extra.len() {
        return Some(format!(
            "holds {} sets and maps where the config wants {}",
            contents.sets.len(),
            DIRECTIONS.len() + extra.len()
        ));
    }
    extra
        .iter()
        .find_map(|&(family, extra)| set_difference(&FAMILIES[family], extra, contents))
}

/// How `direction`'s chain in `contents`, its rules and its map differ from what `plan` and
/// the `wanted` rules want, if they do.
fn chain_difference(
    plan: &[PlannedCounter],
    wanted: &[OurRule],
    contents: &TableContents,
    direction: &Direction,
) -> Option<String> {
    let Some(chain) = contents.chains.iter().find(|c| c.name == direction.chain) else {
        return Some(format!("has no chain {}", direction.chain));
    };
    let hook = Some((direction.hook_number, direction.priority));
    if chain.hook != hook
        || chain.kind.as_deref() != Some("filter")
        || chain.policy != Some(NF_ACCEPT)
    {
        return Some(format!(
            "has the chain {} as {:?} (type, hook and priority, policy) where this build makes it type filter hook {} priority {} policy accept",
            chain.name,
            (&chain.kind, chain.hook, chain.policy),
            direction.hook,
            direction.priority
        ));
    }
    if let Some(checked) = contents.chains.iter().find(|c| c.name == direction.checked)
        && (checked.hook.is_some() || checked.kind.is_some())
    {
        return Some(format!(
            "has the chain {} as a base chain where this build makes it a regular one",
            checked.name
        ));
    }
    // `not_ours` found each rule one of ours: the base chain's, then the checked chain's.
    let found: Vec<OurRule> = [direction.chain, direction.checked]
        .iter()
        .flat_map(|&chain| contents.rules.iter().filter(move |r| r.chain == chain))
        .filter_map(|r| our_rule_form(r, direction))
        .collect();
    if found != wanted {
        let wanted_words = describe(wanted).unwrap_or_default();
        return Some(match describe(&found) {
            Some(words) => format!(
                "counts {words} in its chain {} where the config wants {wanted_words} (made by an earlier build, or under another config)",
                direction.chain
            ),
            None => format!(
                "holds {} rules in its chain {}{} where the config wants {} ({wanted_words}, in that order)",
                found.len(),
                direction.chain,
                if wanted.contains(&OurRule::JumpToChecked) {
                    format!(" and {}", direction.checked)
                } else {
                    String::new()
                },
                wanted.len()
            ),
        });
    }
    map_difference(plan, contents, direction)
}

/// How `direction`'s map in `contents` differs from what `plan` wants, if it does.
fn map_difference(
    plan: &[PlannedCounter],
    contents: &TableContents,
    direction: &Direction,
) -> Option<String> {
    let Some(map) = contents.sets.iter().find(|s| s.name == direction.map) else {
        return Some(format!("has no map {}", direction.map));
    };
    let mut elements: Vec<(Vec<u8>, Option<&str>)> = map
        .elements
        .iter()
        .map(|e| (e.key.clone(), e.object.as_deref()))
        .collect();
    elements.sort_unstable();
    let mut planned: Vec<(Vec<u8>, Option<&str>)> = plan
        .iter()
        .filter(|c| c.inbound == direction.inbound)
        .map(|c| {
            (
                element_key(c.protocol, c.port).to_vec(),
                Some(c.name.as_str()),
            )
        })
        .collect();
    planned.sort_unstable();
    if map.key_len != 8
        || map.object_type != Some(nfnetlink::NFT_OBJECT_COUNTER)
        || elements != planned
    {
        return Some(format!(
            "has the map {} with other elements than the config's ports",
            direction.map
        ));
    }
    None
}

/// How `family`'s set of extra addresses in `contents` differs from `ranges`, if it does.
fn set_difference(
    family: &Family,
    extra: &FamilyRanges,
    contents: &TableContents,
) -> Option<String> {
    let Some(set) = contents.sets.iter().find(|s| s.name == family.set) else {
        return Some(format!("has no set {}", family.set));
    };
    let mut elements: Vec<(Vec<u8>, bool)> = set
        .elements
        .iter()
        .filter(|e| {
            let address_zero =
                e.key.len() == family.address_len as usize && e.key.iter().all(|&byte| byte == 0);
            !(e.interval_end && address_zero)
        })
        .map(|e| (e.key.clone(), e.interval_end))
        .collect();
    elements.sort_unstable();
    if set.key_len != family.address_len
        || set.flags != nfnetlink::NFT_SET_INTERVAL
        || set.object_type.is_some()
        || elements != extra.elements
    {
        return Some(format!(
            "has the set {} with other addresses than the config's extra_local_addresses",
            family.set
        ));
    }
    None
}

/// A map element's key as the kernel holds it: the protocol and the port (big-endian), each
/// in a 32-bit register of its own.
fn element_key(protocol: Protocol, port: u16) -> [u8; 8] {
    let [high, low] = port.to_be_bytes();
    [protocol.number(), 0, 0, 0, high, low, 0, 0]
}

/// Reads of the counters before a ruleset that changes under each gives up for this poll.
const READ_TRIES: usize = 3;

/// Our table, made at start and removed at stop.
pub struct NftTable {
    name: String,
    counters: Vec<PlannedCounter>,
    rule: RuleForm,
    /// The ruleset's generation at which the table was last read whole and found as
    /// planned: while it stands, nothing can have changed it.
    verified: Option<u32>,
    /// The kernel's handle of the table this run made or adopted. A table of that name with
    /// another handle was made by someone else since, even if it reads as planned: a saved
    /// ruleset restored brings our table back with the counts it had when it was saved.
    handle: Option<u64>,
    nft_timeout: Duration,
    /// The counters as last read, kept for a poll whose read fails.
    last_read: Vec<CounterValue>,
    /// Per counter name, the counts a table made by this value starts from (what this run
    /// counted in tables before it: `nft_continuity`).
    starting: HashMap<String, Counts>,
}

/// Whether [`NftTable::setup`] may keep a table of ours that is as planned, counts and all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// The eBPF counters continue from a crashed run's pins: so do its table's.
    CrashedRuns,
    /// Counting starts from zero: a table found as planned was not made by this run (a
    /// saved ruleset restored at boot, say), and its counts would be an old run's.
    Nothing,
}

impl NftTable {
    /// Makes the table, adopts a crashed run's one that is exactly as planned, or replaces
    /// one of ours otherwise. A table of that name that is not ours is left alone: an error.
    /// A table made starts from `starting` (per counter name).
    pub fn setup(
        config: &Config,
        adopt: Adopt,
        starting: HashMap<String, Counts>,
    ) -> Result<Self, NftError> {
        let mut table = Self {
            name: config.nftables.table.clone(),
            counters: plan(config),
            rule: RuleForm::of(config),
            verified: None,
            handle: None,
            nft_timeout: config.nftables.nft_timeout,
            last_read: Vec::new(),
            starting,
        };
        let (contents, generation) = nfnetlink::read_table(&table.name)?.unzip();
        let replace = match judge(&table.counters, &table.rule, contents.as_ref()) {
            Verdict::Absent => None,
            Verdict::AsPlanned if adopt == Adopt::CrashedRuns => {
                tracing::info!(table = %table.name, "adopting the nftables table a previous run left: its counters continue");
                table.verified = generation;
                table.handle = contents.map(|c| c.handle);
                return Ok(table);
            }
            Verdict::AsPlanned => {
                tracing::info!(table = %table.name, "replacing our nftables table, which this run did not make (restored from a saved ruleset?): its counters start from zero");
                contents.map(|c| c.handle)
            }
            Verdict::Differs(why) => {
                tracing::info!(table = %table.name, "replacing our nftables table, which {why}: its counters start from zero");
                contents.map(|c| c.handle)
            }
            Verdict::NotOurs(why) => {
                return Err(NftError::NotOurs {
                    table: table.name,
                    why,
                });
            }
        };
        apply(&table.ruleset(replace), table.nft_timeout)?;
        // One read of the table made: whether `nft` kept its counters' comments, and its
        // handle. The table is made, so it is returned whatever else this finds: a table
        // gone or changed already, or a failed read, shows again at the first read, whose
        // error handling mends the table and removes what is left of it.
        let Ok(made) = nfnetlink::read_table(&table.name) else {
            return Ok(table);
        };
        if let Some((contents, _)) = &made {
            table.keeps_comments(contents)?;
        }
        let _ = table.check(made);
        Ok(table)
    }

    /// The table in nft's JSON, in one transaction (deleting the table with handle
    /// `replace` first, so that only the table judged is deleted). Each chain's rule looks
    /// the packet's protocol and port up in a map, in the [`RuleForm::HostsPackets`] form
    /// checks its address is the namespace's, and counts in the counter the map names: one
    /// hash lookup for a packet on no watched port however many are watched (a rule per
    /// port cost a comparison per port); one on a watched port costs a second one and, with
    /// the address check, a route look-up; with extra addresses, the jump to the checked
    /// chain, and for one not local a look-up of its address in the family's set. (The
    /// `nftables` crate's types cannot express a counter map, hence plain JSON.)
    fn ruleset(&self, replace: Option<u64>) -> serde_json::Value {
        let table = self.name.as_str();
        let mut commands = Vec::new();
        if let Some(handle) = replace {
            commands.push(json!({"delete": {"table": {"family": "inet", "handle": handle}}}));
        }
        // `create`, not `add`: a table of that name made since it was judged absent (or
        // replaced) fails the transaction rather than have our chains merged into it.
        commands.push(json!({"create": {"table": {"family": "inet", "name": table}}}));
        for counter in &self.counters {
            let (packets, bytes) = self
                .starting
                .get(&counter.name)
                .copied()
                .unwrap_or_default();
            commands.push(json!({"add": {"counter": {
                "family": "inet", "table": table, "name": counter.name, "comment": COMMENT,
                "packets": packets, "bytes": bytes,
            }}}));
        }
        if let RuleForm::HostsPackets { extra } = &self.rule {
            commands.extend(extra_sets(table, extra));
        }
        for direction in &DIRECTIONS {
            let elements: Vec<serde_json::Value> = self
                .counters
                .iter()
                .filter(|counter| counter.inbound == direction.inbound)
                .map(|counter| {
                    json!([{"concat": [counter.protocol.as_str(), counter.port]}, counter.name])
                })
                .collect();
            let mut map_object = json!({
                "family": "inet", "table": table, "name": direction.map,
                "type": ["inet_proto", "inet_service"], "map": "counter",
            });
            if !elements.is_empty() {
                map_object["elem"] = serde_json::Value::Array(elements);
            }
            commands.push(json!({"add": {"map": map_object}}));
            commands.push(json!({"add": {"chain": {
                "family": "inet", "table": table, "name": direction.chain, "type": "filter",
                "hook": direction.hook, "prio": direction.priority, "policy": "accept",
            }}}));
            // The port first: only a packet on a watched port costs the address's look-up.
            let key = json!({"concat": [
                {"meta": {"key": "l4proto"}},
                {"payload": {"protocol": "th", "field": direction.field}},
            ]});
            let count =
                json!({"counter": {"map": {"key": key, "data": format!("@{}", direction.map)}}});
            let watched =
                json!({"match": {"op": "==", "left": key, "right": format!("@{}", direction.map)}});
            let local = json!({"match": {
                "op": "==",
                "left": {"fib": {"result": "type", "flags": [direction.address]}},
                "right": "local",
            }});
            if self.rule.checks_in_chains() {
                commands.push(json!({"add": {"chain": {
                    "family": "inet", "table": table, "name": direction.checked,
                }}}));
            }
            for rule in self.rule.rules() {
                let chain = match rule {
                    OurRule::CheckedHost | OurRule::CheckedExtra(_) => direction.checked,
                    _ => direction.chain,
                };
                let expr = match rule {
                    OurRule::PortAlone => json!([count]),
                    OurRule::HostsPackets => json!([watched, local, count]),
                    OurRule::JumpToChecked => {
                        json!([watched, {"jump": {"target": direction.checked}}])
                    }
                    OurRule::CheckedHost => json!([local, count, {"return": null}]),
                    // After the return of a local packet: an extra address that is also
                    // local counts once.
                    OurRule::CheckedExtra(family) => {
                        let family = &FAMILIES[family];
                        json!([
                            {"match": {
                                "op": "==",
                                "left": {"payload": {"protocol": family.protocol, "field": direction.address}},
                                "right": format!("@{}", family.set),
                            }},
                            count,
                        ])
                    }
                };
                commands.push(json!({"add": {"rule": {
                    "family": "inet", "table": table, "chain": chain, "expr": expr,
                }}}));
            }
        }
        json!({"nftables": commands})
    }

    /// Reads every counter of our table (nfnetlink: no process spawned). First the
    /// ruleset's generation: when it moved since the table was last found as planned, the
    /// table is read whole again. A table gone, changed or missing a counter is
    /// [`NftError::Removed`].
    pub fn read(&mut self) -> Result<Vec<CounterValue>, NftError> {
        // The counters are read by name: a table made again between the check and the read
        // (a saved ruleset restored, with its old counts) would pass for ours. So the
        // generation is read again after them, and a read the ruleset moved under is done
        // again, after a new check.
        for _ in 0..READ_TRIES {
            self.verify()?;
            let read = nfnetlink::read_counters(&self.name)?;
            if self.verified == Some(nfnetlink::generation()?) {
                return self.counters_from(&read);
            }
        }
        Err(NftError::Netlink(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            format!("the ruleset changed during each of {READ_TRIES} reads of our counters"),
        )))
    }

    /// The planned counters' values in `read`, kept as the last read.
    fn counters_from(
        &mut self,
        read: &[nfnetlink::Counter],
    ) -> Result<Vec<CounterValue>, NftError> {
        let counters = self
            .counters
            .iter()
            .map(|counter| {
                let value = read
                    .iter()
                    .find(|r| r.name == counter.name)
                    .ok_or_else(|| NftError::Removed {
                        table: self.name.clone(),
                        what: format!("lost its counter {}", counter.name),
                    })?;
                Ok(CounterValue {
                    counter: counter.clone(),
                    packets: value.packets,
                    bytes: value.bytes,
                })
            })
            .collect::<Result<Vec<_>, NftError>>()?;
        self.last_read.clone_from(&counters);
        Ok(counters)
    }

    /// Whether the table just made carries its counters' comments: an `nft` that drops
    /// them (older than 1.0.6) makes a table every read would find "made by an earlier
    /// build" and replace. Without them, from an `nft` that says it is older (or says no
    /// version), it is removed, and no other is made until a restart
    /// ([`Source::drops_comments`]). A table someone else put in ours' place meanwhile (one
    /// not ours, or from a newer `nft`) is left to the first poll's read, as before.
    fn keeps_comments(&self, made: &TableContents) -> Result<(), NftError> {
        if made.objects.iter().all(|counter| counter.comment.is_some()) || not_ours(made).is_some()
        {
            return Ok(());
        }
        let version = nft_tool::describe().0;
        if version
            .as_deref()
            .is_some_and(|version| !nft_tool::older_than_comments(version))
        {
            return Ok(());
        }
        let version = version.unwrap_or_else(|| "nft".to_owned());
        let removed = self.remove().map_err(|err| match err {
            NftError::LeftChanged { .. } => err.to_string(),
            err => format!("removing it failed ({err}); it is tried again now and then"),
        });
        Err(NftError::ToolTooOld { version, removed })
    }

    /// Checks that the table is still as made, unless the ruleset has not changed since
    /// it last was (one small request per poll while nothing changes).
    fn verify(&mut self) -> Result<(), NftError> {
        if self.verified == Some(nfnetlink::generation()?) {
            return Ok(());
        }
        self.check(nfnetlink::read_table(&self.name)?)
    }

    /// Judges the table as read (`None`: there is none), keeping its generation and handle
    /// when it is as made.
    fn check(&mut self, read: Option<(TableContents, u32)>) -> Result<(), NftError> {
        let (contents, generation) = read.unzip();
        let what = match judge(&self.counters, &self.rule, contents.as_ref()) {
            Verdict::AsPlanned
                if self
                    .handle
                    .is_some_and(|handle| contents.as_ref().is_some_and(|c| c.handle != handle)) =>
            {
                "was made again by someone else (a saved ruleset restored?), with counts that are not this run's".to_owned()
            }
            Verdict::AsPlanned => {
                self.verified = generation;
                self.handle = contents.map(|c| c.handle);
                return Ok(());
            }
            Verdict::Absent => "is gone".to_owned(),
            Verdict::Differs(why) => why,
            Verdict::NotOurs(why) => {
                format!("was replaced by a table that is not the collector's (it {why})")
            }
        };
        self.verified = None;
        Err(NftError::Removed {
            table: self.name.clone(),
            what,
        })
    }

    /// Removes the table: a clean stop leaves nothing of ours in nftables. One that someone
    /// else removed already is no error; one of that name that is no longer ours is left, and
    /// an error ([`NftError::LeftChanged`]).
    pub fn remove(&self) -> Result<(), NftError> {
        removed_or_left(&self.name, remove_leftover(&self.name, self.nft_timeout))
    }
}

/// The sets of `extra` addresses in nft's JSON, one per family that has some.
fn extra_sets(table: &str, extra: &ExtraAddresses) -> Vec<serde_json::Value> {
    extra
        .families()
        .map(|(family, extra)| {
            let family = &FAMILIES[family];
            let elements: Vec<serde_json::Value> = extra
                .ranges
                .iter()
                .map(|&(address, prefix)| {
                    if u32::from(prefix) == family.address_len * 8 {
                        json!(address.to_string())
                    } else {
                        json!({"prefix": {"addr": address.to_string(), "len": prefix}})
                    }
                })
                .collect();
            json!({"add": {"set": {
                "family": "inet", "table": table, "name": family.set,
                "type": family.nft_type, "flags": ["interval"], "elem": elements,
            }}})
        })
        .collect()
}

fn apply(ruleset: &serde_json::Value, timeout: Duration) -> Result<(), NftError> {
    nft_tool::apply(ruleset.to_string(), timeout)?;
    Ok(())
}

/// A table of our name found where a crashed run may have left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Absent,
    /// Recognisably ours (of any config): removed by [`remove_leftover`].
    Ours,
    /// Not recognisably ours (the words after "it"): never touched.
    NotOurs(String),
}

/// What the inet table `table` is, without touching it: nor the host, where asking
/// nfnetlink would load `nf_tables` (from a container too) on a host that does not use
/// nftables. Not loaded, it holds no table.
pub fn find_leftover(table: &str) -> Result<Leftover, NftError> {
    if !nf_tables_in_kernel() {
        return Ok(Leftover::Absent);
    }
    Ok(judge_leftover(table)?.0)
}

fn judge_leftover(table: &str) -> Result<(Leftover, u64), NftError> {
    Ok(match nfnetlink::read_table(table)? {
        None => (Leftover::Absent, 0),
        Some((contents, _)) => match not_ours(&contents) {
            Some(why) => (Leftover::NotOurs(why), contents.handle),
            None => (Leftover::Ours, contents.handle),
        },
    })
}

/// Removes the inet table `table` if it is recognisably ours (a crashed run's; `collector
/// cleanup --apply`), by the handle it was judged by; returns what it found.
pub fn remove_leftover(table: &str, nft_timeout: Duration) -> Result<Leftover, NftError> {
    let (found, handle) = judge_leftover(table)?;
    if found == Leftover::Ours {
        apply(
            &json!({"nftables": [
                {"delete": {"table": {"family": "inet", "handle": handle}}},
            ]}),
            nft_timeout,
        )?;
    }
    Ok(found)
}

/// Polls between two looks at what is missing: whether `auto` should count now, or whether
/// a table that could not be made can be now (each look may spawn `nft`).
const POLLS_BETWEEN_RETRIES: u32 = 30;

/// The nftables counters as a source of the poll: our table, or why there is none. A
/// missing `nft` tool or kernel support leaves this source down and everything else running;
/// a table someone removed or changed is made again (by `auto` only if netfilter still
/// hooks prerouting and postrouting); `auto` looks again now and then, as a firewall or
/// kube-proxy may hook netfilter after the agent started.
pub struct Source {
    config: Config,
    /// The config's `[nftables] enabled`, as [`mode`] takes it.
    mode: NftEnabled,
    /// Counting is wanted (on, or `auto` with netfilter hooked).
    enabled: bool,
    table: Option<NftTable>,
    /// The table's name, ours while this runs (taken before the table is made).
    claim: Option<TableClaim>,
    health: SourceHealth,
    polls_until_retry: u32,
    /// `auto` stopped counting because the table was removed: the next look says so.
    removed: bool,
    /// What is left of our table, found removed or changed, while no table has been made
    /// since.
    left: Left,
    /// What the next table made may adopt: a crashed run's at the first try only.
    adopt: Adopt,
    /// A later try at making the table (or at removing what is left of one), on a thread of
    /// its own: a stuck `nft` holds it, not the poll loop, for up to `[nftables]
    /// nft_timeout_ms`.
    making: Option<Making>,
    /// Carries the counts over a table made again or a reset, so that the series only grow.
    continuity: Continuity,
    /// The counts last served: served on, with the source down, while the table is away and
    /// counting is wanted (series missing from a scrape end in Prometheus).
    last_served: Vec<CounterValue>,
    /// An `nft` made our table without its counters' comments
    /// ([`NftTable::keeps_comments`]): none is made again until a restart.
    drops_comments: bool,
}

/// What is left of our table when none is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    Nothing,
    /// A poll found it removed or changed (what is left, its chains still hooked if only its
    /// rules were flushed, is ours to remove), or an `nft` killed at its deadline may have
    /// made it.
    Ours,
    /// A removal found it changed by someone into a table we do not recognise, and left it:
    /// looked at again at the stop, which fails if it is still there.
    Changed,
}

struct Making {
    began: std::time::Instant,
    thread: std::thread::JoinHandle<Finished>,
}

/// What a [`Making`] thread did.
enum Finished {
    Made(Result<NftTable, NftError>),
    /// Removed what was left of our table, or why not.
    Removed(Result<(), NftError>),
}

/// When `auto` looks at netfilter's hooks, for what it logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    AtStart,
    /// After a poll found our table removed: stopping counting is news.
    AfterRemoval,
    /// Now and then while not counting: starting is news.
    Later,
}

impl Source {
    /// Starts counting if wanted, or removes the table an earlier run left if not.
    /// `after_crash`: this start took over a crashed run's pins, whose table it may adopt.
    pub fn start(config: &Config, after_crash: bool) -> Self {
        let mut source = Self {
            config: config.clone(),
            mode: mode(config),
            enabled: false,
            table: None,
            claim: None,
            health: SourceHealth::default(),
            polls_until_retry: POLLS_BETWEEN_RETRIES,
            removed: false,
            left: Left::Nothing,
            adopt: if after_crash {
                Adopt::CrashedRuns
            } else {
                Adopt::Nothing
            },
            making: None,
            continuity: Continuity::default(),
            last_served: Vec::new(),
            drops_comments: false,
        };
        if source.mode != config.nftables.enabled {
            tracing::info!("nftables counters off: {NOTHING_TO_COUNT}");
        }
        source.enabled = match source.mode {
            NftEnabled::On => true,
            NftEnabled::Off => false,
            NftEnabled::Auto => source.auto_wants_counting(Look::AtStart),
        };
        if source.enabled {
            source.make_table();
        } else {
            // Only the first try may adopt (see `make_table`): the crashed run's table is
            // removed here, and one found when counting starts later may be a saved ruleset's.
            source.adopt = Adopt::Nothing;
            if source.claim_name().is_ok() {
                source.remove_leftover_at_start();
                // Claimed only for the look: a collector of this namespace that counts may
                // take the name next.
                source.claim = None;
            }
        }
        source
    }

    /// With counting off, removes our table an earlier run left hooked: a crash, or a stop
    /// cut short (its `nft` stuck on the ruleset lock past the stop timeout) after its pins
    /// were gone, which no later start would have taken for a crash. Left, its chains hook
    /// every packet for nothing; `auto` does not see it as a firewall, so it stayed off and
    /// left it for good. Found over netlink: `nft` runs only to delete one.
    fn remove_leftover_at_start(&self) {
        let table = &self.config.nftables.table;
        // With counting off, nf_tables is not loaded for the look: asking nfnetlink for it
        // would load the module on a host that does not use nftables. Not loaded, it holds
        // no table. (`auto` asks anyway, for the hooks.)
        if self.mode == NftEnabled::Off && !nf_tables_in_kernel() {
            return;
        }
        match remove_leftover(table, self.config.nftables.nft_timeout) {
            Ok(Leftover::Ours) => tracing::info!(
                "removed the nftables table inet {table} an earlier run left: counting is off now"
            ),
            Ok(Leftover::Absent) => {}
            Ok(Leftover::NotOurs(why)) => tracing::info!(
                "left the nftables table inet {table}: it is not the collector's (it {why})"
            ),
            // No nf_tables here: no table can be left either.
            Err(NftError::Netlink(err)) if nfnetlink::without_nf_tables(&err) => {}
            Err(err) => tracing::warn!(
                "removing the nftables table inet {table} an earlier run left: {err}"
            ),
        }
    }

    /// `auto`: counting only rides on hooks that netfilter already has here.
    fn auto_wants_counting(&self, look: Look) -> bool {
        let off = "nftables counters off ([nftables] enabled = \"auto\")";
        match netfilter_already_hooks(&self.config.nftables.table) {
            Ok(Hooks { firewall: true, .. }) => {
                if look == Look::Later {
                    tracing::info!(
                        "nftables counters on: netfilter now hooks prerouting and postrouting here ([nftables] enabled = \"auto\")"
                    );
                }
                true
            }
            Ok(Hooks {
                firewall: false,
                collectors,
            }) => {
                // A collector's table hooks, and is no firewall: one a crashed run left under
                // another name costs every packet until someone deletes it.
                let others = if collectors.is_empty() {
                    String::new()
                } else {
                    let tables: Vec<String> =
                        collectors.iter().map(|t| format!("inet {t}")).collect();
                    format!(
                        " (only collector tables do: {}; one a crashed run left under another name goes with `nft delete table inet NAME`)",
                        tables.join(", ")
                    )
                };
                match look {
                    Look::AtStart => tracing::info!(
                        "{off}: nothing else hooks netfilter's prerouting and postrouting here{others}, and a first hook slows every packet; set enabled = true to count anyway"
                    ),
                    Look::AfterRemoval => tracing::info!(
                        "{off}: our table was removed, and nothing else hooks netfilter's prerouting and postrouting here any more (the removal took the firewall too?); looked at again every {POLLS_BETWEEN_RETRIES} polls"
                    ),
                    Look::Later => {}
                }
                false
            }
            Err(err) => {
                if look != Look::Later {
                    tracing::info!("{off}: {err}");
                }
                false
            }
        }
    }

    /// Claims the table's name unless this run holds it already; otherwise says who holds it
    /// now (the holder may have restarted since the last look).
    fn claim_name(&mut self) -> Result<(), NftError> {
        if self.claim.is_some() {
            return Ok(());
        }
        let table = &self.config.nftables.table;
        match nft_claim::claim(table).map_err(NftError::Claim)? {
            Some(claim) => {
                self.claim = Some(claim);
                Ok(())
            }
            None => Err(NftError::InUse {
                table: table.clone(),
                holder: nft_claim::holder(table),
            }),
        }
    }

    /// Makes the table now: at the start, which serves only once it is made or known not to
    /// be.
    fn make_table(&mut self) {
        let began = std::time::Instant::now();
        let setup = self.claim_name().and_then(|()| {
            NftTable::setup(&self.config, self.adopt, self.continuity.starting_counts())
        });
        // Only the first try may adopt: a table found later may be a saved ruleset's,
        // restored meanwhile with its old counts.
        self.adopt = Adopt::Nothing;
        self.made(setup, began);
    }

    /// Starts making the table on a thread; a later poll takes it ([`Self::take_made`]).
    fn start_making(&mut self) {
        let began = std::time::Instant::now();
        if let Err(err) = self.claim_name() {
            self.made(Err(err), began);
            return;
        }
        let config = self.config.clone();
        let adopt = std::mem::replace(&mut self.adopt, Adopt::Nothing);
        let starting = self.continuity.starting_counts();
        self.making = Some(Making {
            began,
            thread: std::thread::spawn(move || {
                Finished::Made(NftTable::setup(&config, adopt, starting))
            }),
        });
    }

    /// Starts removing what is left of our table on a thread, as [`Self::start_making`].
    fn start_removing_what_is_left(&mut self) {
        let config = self.config.clone();
        self.making = Some(Making {
            began: std::time::Instant::now(),
            thread: std::thread::spawn(move || {
                let removal = remove_what_is_left(&config);
                match &removal {
                    Ok(()) => {}
                    Err(err @ NftError::LeftChanged { .. }) => tracing::warn!("{err}"),
                    Err(err) => tracing::warn!(
                        "removing what was left of our nftables table inet {}: {err}",
                        config.nftables.table
                    ),
                }
                Finished::Removed(removal)
            }),
        });
    }

    /// Takes the table a thread made, once it is done (`wait`: waits for it).
    fn take_made(&mut self, wait: bool) {
        if !wait
            && self
                .making
                .as_ref()
                .is_none_or(|making| !making.thread.is_finished())
        {
            return;
        }
        let Some(making) = self.making.take() else {
            return;
        };
        match making
            .thread
            .join()
            .unwrap_or(Finished::Made(Err(NftError::MakingPanicked)))
        {
            Finished::Made(setup) => self.made(setup, making.began),
            // Removed: nothing is left.
            Finished::Removed(Ok(())) => {}
            // Left as someone made it: not tried again at every look.
            Finished::Removed(Err(NftError::LeftChanged { .. })) => self.left = Left::Changed,
            // Still ours to remove: at the next look, or at the stop.
            Finished::Removed(Err(_)) => self.left = Left::Ours,
        }
    }

    fn made(&mut self, setup: Result<NftTable, NftError>, began: std::time::Instant) {
        self.health.record(&setup, began.elapsed());
        match setup {
            Ok(table) => {
                self.table = Some(table);
                self.left = Left::Nothing;
                self.continuity.table_made();
            }
            Err(err) => {
                self.drops_comments |= matches!(err, NftError::ToolTooOld { .. });
                // A killed `nft` may have made the table, or may still: it is ours to remove,
                // at the next try or at the stop.
                if matches!(
                    err,
                    NftError::Tool(
                        nft_tool::ToolError::TimedOut(_) | nft_tool::ToolError::Killed(_)
                    ) | NftError::ToolTooOld {
                        removed: Err(_),
                        ..
                    }
                ) {
                    self.left = Left::Ours;
                }
                tracing::warn!("nftables counters are off for now: {err}");
            }
        }
    }

    /// This poll's counters and the source's health (none while counting is not wanted).
    pub fn read(&mut self) -> poller::NftView {
        if let Some(claim) = &self.claim {
            claim.drain();
        }
        self.take_made(false);
        if self.table.is_none() && self.making.is_none() {
            self.retry_now_and_then();
        }
        let Some(table) = &mut self.table else {
            return self.served_while_away();
        };
        let began = std::time::Instant::now();
        let read = table.read();
        self.health.record(&read, began.elapsed());
        let counters = match read {
            Ok(counters) => self.continuity.continued(counters),
            Err(err @ NftError::Removed { .. }) => {
                self.forget_removed_table(&err);
                return self.served_while_away();
            }
            // A read that failed otherwise (a dump interrupted again and again, ENOBUFS)
            // leaves the table as it was: its series go on at their last counts, for series
            // missing from a scrape end in Prometheus. The source's health says it failed.
            // A table not read yet has the counts served before it.
            Err(_) if table.last_read.is_empty() => self.last_served.clone(),
            Err(_) => self.continuity.continued(table.last_read.clone()),
        };
        self.last_served.clone_from(&counters);
        poller::NftView {
            counters,
            health: Some(self.health.clone()),
        }
    }

    /// No table to read: the last counts served while counting is wanted (the table made
    /// again goes on from them), none while it is not. After a removal `auto` still wants it
    /// until its next look at the hooks: a firewall reload (`flush ruleset` and the firewall
    /// again, in one transaction) removes our table and keeps the hooks, and the series then
    /// go on without a gap (until 2026-12-05 they vanished for two polls or more).
    fn served_while_away(&mut self) -> poller::NftView {
        let wanted = self.enabled || self.removed;
        if !wanted {
            self.last_served.clear();
        }
        poller::NftView {
            counters: self.last_served.clone(),
            health: wanted.then(|| self.health.clone()),
        }
    }

    /// After a read found our table removed or changed: made again at the next try.
    fn forget_removed_table(&mut self, err: &NftError) {
        tracing::warn!("{err}");
        self.table = None;
        self.continuity.table_gone();
        self.left = Left::Ours;
        self.polls_until_retry = 0;
        // `auto` looks at the hooks again before it makes the table again: what removed
        // ours (nft flush ruleset) may have removed the firewall whose hooks it rode on.
        if self.mode == NftEnabled::Auto {
            self.enabled = false;
            self.removed = true;
        }
    }

    fn retry_now_and_then(&mut self) {
        if self.polls_until_retry > 0 {
            self.polls_until_retry -= 1;
            return;
        }
        self.polls_until_retry = POLLS_BETWEEN_RETRIES;
        if !self.enabled && self.mode == NftEnabled::Auto {
            let look = if std::mem::take(&mut self.removed) {
                Look::AfterRemoval
            } else {
                Look::Later
            };
            self.enabled = self.auto_wants_counting(look);
            // What was found "removed" may be our table changed (its rules flushed), still
            // hooked: with counting off it would be the namespace's first hook for good.
            // Looked at again after a removal that failed.
            if !self.enabled && self.left == Left::Ours {
                self.start_removing_what_is_left();
                self.left = Left::Nothing;
            }
        }
        // An `nft` that drops the counters' comments makes none this run could keep; the
        // one it made is removed again where that failed.
        if self.enabled && self.drops_comments {
            if self.left == Left::Ours {
                self.start_removing_what_is_left();
                self.left = Left::Nothing;
            }
        } else if self.enabled {
            self.start_making();
        }
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        // A table being made is ours to remove too, and so is one a killed `nft` may still
        // make once it leaves the kernel.
        self.take_made(true);
        if !nft_tool::wait_for_killed(self.config.nftables.nft_timeout) {
            tracing::warn!(
                "an nft killed at its deadline has still not exited: a table inet {table} it may \
                 make later is left; once this process is gone, `nft delete table inet {table}` \
                 removes it",
                table = self.config.nftables.table,
            );
        }
        let table = &self.config.nftables.table;
        match self.table {
            Some(made) => made
                .remove()
                .map_err(|err| left_at_stop(err, "our nftables table", table)),
            // A poll found our table changed (its rules flushed), or an `nft` killed at its
            // deadline may have made it after all, and it is not made again yet: what is
            // left of it is still ours, and may still hook every packet. One left changed by
            // someone is looked at again: still there, the stop fails.
            None if self.left != Left::Nothing => remove_what_is_left(&self.config)
                .map_err(|err| left_at_stop(err, "what was left of our nftables table", table)),
            None => Ok(()),
        }
    }
}

/// The stop's error for a table it could not remove: one changed by someone says itself what
/// to do; otherwise the command that removes it once this process is gone.
fn left_at_stop(err: NftError, what: &str, table: &str) -> anyhow::Error {
    if matches!(err, NftError::LeftChanged { .. }) {
        return err.into();
    }
    anyhow::Error::from(err).context(format!(
        "removing {what} (once this process is gone, `nft delete table inet {table}` removes it)"
    ))
}

/// Removes what is left of our table after a poll found it changed, if it is still
/// recognisably ours.
fn remove_what_is_left(config: &Config) -> Result<(), NftError> {
    let table = &config.nftables.table;
    let removal = remove_leftover(table, config.nftables.nft_timeout);
    if matches!(removal, Ok(Leftover::Ours)) {
        tracing::info!("removed what was left of our nftables table inet {table}");
    }
    removed_or_left(table, removal)
}

/// A removal's outcome: one that left the table, changed by someone into one we do not
/// recognise (a chain or set added, whose chains may still hook every packet), failed too.
fn removed_or_left(table: &str, removal: Result<Leftover, NftError>) -> Result<(), NftError> {
    match removal? {
        Leftover::Ours | Leftover::Absent => Ok(()),
        Leftover::NotOurs(why) => Err(NftError::LeftChanged {
            table: table.to_owned(),
            why,
        }),
    }
}

/// Netfilter's hook numbers for the two points our chains use.
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;

/// Whether something other than our tables already hooks netfilter at prerouting and at
/// postrouting in this namespace (nftables base chains of ip, ip6 or inet, or legacy
/// iptables tables). Then our chains ride on hooks every packet already passes; otherwise
/// they would be the first, and the first hook of a namespace costs every packet
/// (docs/DESIGN.md has the measurement). Left out: the table named `ours`, and any other
/// table that is recognisably a collector's (a crashed run's under an earlier name, or
/// another collector's here), whose hooks are no firewall's. Only a table with a chain named
/// as ours is read whole to tell: a firewall's (firewalld's thousands of rules) is not.
pub fn netfilter_already_hooks(ours: &str) -> Result<Hooks, NftError> {
    let mut judged: Vec<(String, bool)> = Vec::new();
    let mut is_a_collectors = |table: &str| -> Result<bool, NftError> {
        if let Some((_, verdict)) = judged.iter().find(|(name, _)| name == table) {
            return Ok(*verdict);
        }
        let verdict = nfnetlink::read_table(table)?
            .is_some_and(|(contents, _)| not_ours(&contents).is_none());
        judged.push((table.to_owned(), verdict));
        Ok(verdict)
    };
    let mut hooks = Vec::new();
    for chain in nfnetlink::ip_hooks()? {
        let named_as_ours = direction_of_chain(&chain.chain).is_some();
        let a_collectors_hook = chain.inet
            && (chain.table == ours || (named_as_ours && is_a_collectors(&chain.table)?));
        if !a_collectors_hook {
            hooks.push(chain.hook);
        }
    }
    hooks.extend(legacy_ip_hooks());
    let collectors = judged
        .into_iter()
        .filter_map(|(table, collectors)| collectors.then_some(table))
        .collect();
    Ok(Hooks {
        firewall: hooks.contains(&NF_INET_PRE_ROUTING) && hooks.contains(&NF_INET_POST_ROUTING),
        collectors,
    })
}

/// Whether asking nfnetlink for `nf_tables` loads no module: it is loaded (/proc/modules),
/// or built in (/sys/module shows that only for modules with parameters; modules.builtin
/// does, where /lib/modules is there; else its symbols in /proc/kallsyms), or the kernel
/// loads no modules at all (no /proc/modules: many VMs' kernels). Until 2026-12-05 a missing
/// /lib/modules counted as a kernel without modules: in a container on a kernel that loads
/// them, a look-up then loaded `nf_tables` on the host.
pub(crate) fn nf_tables_in_kernel() -> bool {
    let Ok(loaded) = std::fs::read_to_string("/proc/modules") else {
        return true;
    };
    if std::path::Path::new("/sys/module/nf_tables").exists()
        || loaded.lines().any(|line| line.starts_with("nf_tables "))
    {
        return true;
    }
    // Built in, where no /lib/modules says so (a container): its symbols are the kernel's.
    let release = crate::check::kernel_release().unwrap_or_default();
    std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin"))
        .is_ok_and(|builtin| builtin.lines().any(|line| line.ends_with("/nf_tables.ko")))
        || std::fs::read_to_string("/proc/kallsyms").is_ok_and(|symbols| {
            symbols
                .lines()
                .any(|line| line.split_whitespace().nth(2) == Some("nft_register_expr"))
        })
}

/// What hooks netfilter in this namespace, as `auto` judges it.
pub struct Hooks {
    /// Something other than collectors' tables hooks both prerouting and postrouting.
    pub firewall: bool,
    /// Collectors' tables found hooking, other than the one the config names.
    pub collectors: Vec<String>,
}

/// The prerouting and postrouting hooks of legacy iptables tables in this namespace.
fn legacy_ip_hooks() -> Vec<u32> {
    let mut hooks = Vec::new();
    for file in ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"] {
        // Absent without the ip_tables module: no legacy tables.
        let names = std::fs::read_to_string(file).unwrap_or_default();
        for table in names.lines() {
            hooks.extend_from_slice(match table.trim() {
                "nat" | "mangle" => &[NF_INET_PRE_ROUTING, NF_INET_POST_ROUTING][..],
                "raw" => &[NF_INET_PRE_ROUTING][..],
                _ => &[][..],
            });
        }
    }
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_shared_by_name_is_counted_once_for_its_route_without_names() {
        let config = Config::from_toml(
            "test.toml",
            "[[routes]]\nname = \"api\"\nports = [443]\nsni = [\"api.example.com\"]\n\
             [[routes]]\nname = \"tls\"\nports = [443]\n[dns]\nenabled = false\n",
        )
        .unwrap();
        let planned: Vec<(String, String)> = plan(&config)
            .into_iter()
            .map(|c| (c.name, c.route))
            .collect();
        assert_eq!(
            planned,
            [
                ("tcp_443_in".to_owned(), "tls".to_owned()),
                ("tcp_443_out".to_owned(), "tls".to_owned())
            ]
        );
    }

    /// An empty table would cost every packet its chains' hooks for no counter: counting is
    /// off whatever `enabled` says, with upstreams alone too (their ports get no counter).
    #[test]
    fn a_config_with_nothing_to_count_turns_counting_off() {
        let mode_of = |toml: &str| mode(&Config::from_toml("test.toml", toml).unwrap());
        let on = "[nftables]\nenabled = true\n";
        assert_eq!(mode_of(on), NftEnabled::On, "DNS alone is counted");
        let dns_off = "[dns]\nenabled = false\n";
        assert_eq!(mode_of(&format!("{dns_off}{on}")), NftEnabled::Off);
        assert_eq!(
            mode_of(&format!(
                "{dns_off}{on}[[upstreams]]\nname = \"app\"\nports = [8080]\n"
            )),
            NftEnabled::Off
        );
        assert_eq!(
            mode_of(&format!(
                "{dns_off}[nftables]\nenabled = \"auto\"\n[[routes]]\nname = \"web\"\nports = [80]\n"
            )),
            NftEnabled::Auto
        );
    }

    #[test]
    fn every_route_and_dns_port_gets_a_counter_each_way() {
        let config = Config::from_toml(
            "test.toml",
            "[[routes]]\nname = \"web\"\nports = [80, 8080]\n\n[dns]\nports = [53]\n",
        )
        .unwrap();
        let names: Vec<String> = plan(&config).into_iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "tcp_80_in",
                "tcp_80_out",
                "tcp_8080_in",
                "tcp_8080_out",
                "udp_53_in",
                "udp_53_out"
            ]
        );
        let dns = &plan(&config)[4];
        assert_eq!(
            (dns.route.as_str(), dns.protocol, dns.inbound),
            ("dns", Protocol::Udp, true)
        );
    }

    #[test]
    fn the_ruleset_is_one_lookup_per_chain_into_a_map_of_counters_for_the_hosts_addresses() {
        let config =
            Config::from_toml("t.toml", "[[routes]]\nname = \"web\"\nports = [80]\n").unwrap();
        let mut table = NftTable {
            name: "collector".into(),
            counters: plan(&config),
            rule: RuleForm::of(&config),
            verified: None,
            handle: None,
            nft_timeout: config.nftables.nft_timeout,
            last_read: Vec::new(),
            starting: HashMap::from([("udp_53_in".to_owned(), (4, 300))]),
        };
        let json = table.ruleset(None);
        let objects = json["nftables"].as_array().unwrap();
        // Made with `create`: a table of that name made meanwhile fails it, not merges.
        assert_eq!(
            objects[0],
            json!({"create": {"table": {"family": "inet", "name": "collector"}}})
        );
        // Table, four counters, then (map, chain, rule) per direction.
        assert_eq!(objects.len(), 1 + 4 + 2 * 3);
        let map = &objects[5]["add"]["map"];
        assert_eq!(map["name"], "ports_in");
        assert_eq!(
            map["elem"],
            json!([
                [{"concat": ["tcp", 80]}, "tcp_80_in"],
                [{"concat": ["udp", 53]}, "udp_53_in"]
            ])
        );
        let rule = &objects[7]["add"]["rule"];
        assert_eq!(rule["chain"], "count_in");
        // The port first, then the address, then the count.
        assert_eq!(rule["expr"][0]["match"]["right"], "@ports_in");
        assert_eq!(
            rule["expr"][1]["match"],
            json!({"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"})
        );
        assert_eq!(rule["expr"][2]["counter"]["map"]["data"], "@ports_in");
        assert_eq!(
            rule["expr"][2]["counter"]["map"]["key"]["concat"][1]["payload"]["field"],
            "dport"
        );
        assert_eq!(
            objects[10]["add"]["rule"]["expr"][1]["match"]["left"]["fib"]["flags"],
            json!(["saddr"])
        );
        assert_eq!(objects[1]["add"]["counter"]["comment"], COMMENT);
        // Each counter starts from what this run's tables before it counted.
        let starting = |name: &str| {
            let counter = objects[1..5]
                .iter()
                .map(|object| &object["add"]["counter"])
                .find(|counter| counter["name"] == name)
                .unwrap();
            (counter["packets"].clone(), counter["bytes"].clone())
        };
        assert_eq!(starting("udp_53_in"), (json!(4), json!(300)));
        assert_eq!(starting("tcp_80_in"), (json!(0), json!(0)));
        assert_eq!(objects[6]["add"]["chain"]["prio"], -301);
        assert_eq!(objects[10]["add"]["rule"]["chain"], "count_out");
        // Out after source NAT (100), which puts a DNATed reply's source port back.
        assert_eq!(objects[9]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(objects[9]["add"]["chain"]["prio"], 300);
        // A replacement deletes the table judged, by its handle, not whatever has the name.
        assert_eq!(
            table.ruleset(Some(7))["nftables"][0],
            json!({"delete": {"table": {"family": "inet", "handle": 7}}})
        );
        // By port alone: the count, nothing before it.
        table.rule = RuleForm::PortAlone;
        let expr = &table.ruleset(None)["nftables"][7]["add"]["rule"]["expr"];
        assert_eq!(expr.as_array().unwrap().len(), 1);
        assert_eq!(expr[0]["counter"]["map"]["data"], "@ports_in");
    }

    /// With `all_namespaces` the classifiers count by port alone, and so does nftables: it
    /// would otherwise read below eBPF for what both should see. Extra local addresses go
    /// into a set per family, an IPv4-mapped one into the IPv4 set.
    #[test]
    fn the_port_alone_decides_where_the_classifiers_count_by_port() {
        assert_eq!(form(""), hosts());
        assert_eq!(form("all_namespaces = true\n"), RuleForm::PortAlone);
        let many: Vec<String> = (0..=EXTRA_RANGES_IN_SETS_MAX)
            .map(|n| format!("\"10.80.{}.{}\"", n / 256, n % 256))
            .collect();
        let top = format!("extra_local_addresses = [{}]\n", many.join(", "));
        assert_eq!(form(&top), RuleForm::PortAlone);
        let RuleForm::HostsPackets { extra } = form(
            "extra_local_addresses = [\"203.0.113.0/28\", \"2001:db8::/120\", \
             \"::ffff:198.51.100.7\"]\n",
        ) else {
            panic!("by port alone")
        };
        let families: Vec<(usize, Vec<String>)> = extra
            .families()
            .map(|(family, extra)| {
                let ranges = extra
                    .ranges
                    .iter()
                    .map(|(a, p)| format!("{a}/{p}"))
                    .collect();
                (family, ranges)
            })
            .collect();
        assert_eq!(
            families,
            [
                (
                    0,
                    vec!["203.0.113.0/28".to_owned(), "198.51.100.7/32".to_owned()]
                ),
                (1, vec!["2001:db8::/120".to_owned()]),
            ]
        );
    }

    /// The rule form of a config with a route on port 80 and `top` above it.
    fn form(top: &str) -> RuleForm {
        let toml = format!("{top}[[routes]]\nname = \"web\"\nports = [80]\n");
        RuleForm::of(&Config::from_toml("t.toml", &toml).unwrap())
    }

    /// The host's packets, no extra addresses.
    fn hosts() -> RuleForm {
        RuleForm::HostsPackets {
            extra: ExtraAddresses::default(),
        }
    }

    /// The table with extra addresses: a set per family, made before the chains whose rules
    /// look in them; in each base chain the jump, in each checked chain the host's rule, then
    /// one per family.
    #[test]
    fn extra_local_addresses_are_counted_in_a_chain_of_their_own_from_a_set_per_family() {
        let config = Config::from_toml(
            "t.toml",
            "extra_local_addresses = [\"203.0.113.0/28\", \"198.51.100.7\", \"2001:db8::/120\"]\n\
             [[routes]]\nname = \"web\"\nports = [80]\n",
        )
        .unwrap();
        let table = NftTable {
            name: "collector".into(),
            counters: plan(&config),
            rule: RuleForm::of(&config),
            verified: None,
            handle: None,
            nft_timeout: config.nftables.nft_timeout,
            last_read: Vec::new(),
            starting: HashMap::new(),
        };
        let json = table.ruleset(None);
        let objects = json["nftables"].as_array().unwrap();
        // Table, four counters, two sets, then per direction its map, its base chain, its
        // checked chain and 4 rules.
        assert_eq!(objects.len(), 1 + 4 + 2 + 2 * 7);
        assert_eq!(
            objects[5]["add"]["set"],
            json!({
                "family": "inet", "table": "collector", "name": "extra_ipv4",
                "type": "ipv4_addr", "flags": ["interval"],
                "elem": [{"prefix": {"addr": "203.0.113.0", "len": 28}}, "198.51.100.7"],
            })
        );
        assert_eq!(objects[6]["add"]["set"]["name"], "extra_ipv6");
        assert_eq!(objects[6]["add"]["set"]["type"], "ipv6_addr");
        // The checked chain is a regular one, made before the rule that jumps to it.
        assert_eq!(
            objects[9]["add"]["chain"],
            json!({"family": "inet", "table": "collector", "name": "checked_in"})
        );
        let rules: Vec<&serde_json::Value> = objects
            .iter()
            .filter_map(|o| o["add"].get("rule"))
            .collect();
        assert_eq!(rules.len(), 8);
        // In: a packet on a watched port jumps; there the host's are counted and go back,
        // then IPv4's and IPv6's extra destinations are counted.
        assert_eq!(rules[0]["chain"], "count_in");
        assert_eq!(rules[0]["expr"][0]["match"]["right"], "@ports_in");
        assert_eq!(
            rules[0]["expr"][1],
            json!({"jump": {"target": "checked_in"}})
        );
        assert_eq!(rules[1]["chain"], "checked_in");
        assert_eq!(
            rules[1]["expr"][0]["match"],
            json!({"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"})
        );
        assert_eq!(rules[1]["expr"][2], json!({"return": null}));
        let ipv4 = &rules[2]["expr"];
        assert_eq!(
            ipv4[0]["match"],
            json!({"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@extra_ipv4"})
        );
        assert_eq!(ipv4[1]["counter"]["map"]["data"], "@ports_in");
        assert_eq!(
            rules[3]["expr"][0]["match"]["left"]["payload"]["protocol"],
            "ip6"
        );
        // Out: their sources.
        assert_eq!(rules[4]["chain"], "count_out");
        assert_eq!(rules[5]["chain"], "checked_out");
        assert_eq!(
            rules[5]["expr"][0]["match"]["left"]["fib"]["flags"],
            json!(["saddr"])
        );
        assert_eq!(
            rules[6]["expr"][0]["match"]["left"]["payload"]["field"],
            "saddr"
        );
    }

    /// As `nft --debug=netlink` lists an interval set's elements: a range's first address,
    /// and the one after its last as its end, none past the family's last address.
    #[test]
    fn an_interval_set_holds_each_ranges_first_address_and_the_one_after_its_last() {
        let v4 = |a: [u8; 4], prefix| (IpAddr::from(a), prefix);
        assert_eq!(
            interval_elements(&[v4([203, 0, 113, 0], 28), v4([203, 0, 113, 16], 28)]),
            [
                (vec![203, 0, 113, 0], false),
                (vec![203, 0, 113, 16], false),
                (vec![203, 0, 113, 16], true),
                (vec![203, 0, 113, 32], true),
            ]
        );
        assert_eq!(
            interval_elements(&[v4([10, 0, 0, 1], 32), v4([255, 255, 255, 0], 24)]),
            [
                (vec![10, 0, 0, 1], false),
                (vec![10, 0, 0, 2], true),
                (vec![255, 255, 255, 0], false),
            ]
        );
        let top: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00".parse().unwrap();
        assert_eq!(interval_elements(&[(top, 120)]).len(), 1);
        let mut end = [0x20, 0x01, 0x0d, 0xb8].to_vec();
        end.extend([0; 10]);
        end.extend([1, 0]);
        assert_eq!(
            interval_elements(&[("2001:db8::".parse().unwrap(), 120)])[1],
            (end, true)
        );
    }

    use nfnetlink::{Chain, Element, Expression, Object, Rule, Set};

    fn be32(value: u32) -> Vec<u8> {
        value.to_be_bytes().to_vec()
    }

    fn expression(name: &str, data: Vec<(u16, Vec<u8>)>) -> Expression {
        Expression {
            name: name.into(),
            data,
        }
    }

    /// `cmp`'s data: an `NFTA_DATA_VALUE` attribute (type 1) of `value`, padded to 4 bytes.
    fn cmp_data(value: &[u8]) -> Vec<u8> {
        let mut data = vec![u8::try_from(4 + value.len()).unwrap(), 0, 1, 0];
        data.extend(value);
        data.resize(data.len().next_multiple_of(4), 0);
        data
    }

    /// A look-up in `set` as a condition.
    fn lookup_in(set: &str) -> Expression {
        expression(
            "lookup",
            vec![
                (nfnetlink::NFTA_LOOKUP_SET, format!("{set}\0").into()),
                (2, be32(1)),
                (nfnetlink::NFTA_LOOKUP_FLAGS, be32(0)),
            ],
        )
    }

    /// `d`'s address checked to be local.
    fn fib_local(d: &Direction) -> [Expression; 2] {
        [
            expression(
                "fib",
                vec![
                    (nfnetlink::NFTA_FIB_DREG, be32(1)),
                    (
                        nfnetlink::NFTA_FIB_RESULT,
                        be32(nfnetlink::NFT_FIB_RESULT_ADDRTYPE),
                    ),
                    (nfnetlink::NFTA_FIB_FLAGS, be32(d.fib_flag)),
                ],
            ),
            expression(
                "cmp",
                vec![
                    (nfnetlink::NFTA_CMP_SREG, be32(1)),
                    (nfnetlink::NFTA_CMP_OP, be32(nfnetlink::NFT_CMP_EQ)),
                    (
                        nfnetlink::NFTA_CMP_DATA,
                        cmp_data(&nfnetlink::RTN_LOCAL.to_ne_bytes()),
                    ),
                ],
            ),
        ]
    }

    /// The packet's protocol and `d`'s port, loaded.
    fn port_key(d: &Direction) -> [Expression; 2] {
        [
            expression(
                "meta",
                vec![
                    (1, be32(1)),
                    (nfnetlink::NFTA_META_KEY, be32(nfnetlink::NFT_META_L4PROTO)),
                ],
            ),
            expression(
                "payload",
                vec![
                    (1, be32(9)),
                    (
                        nfnetlink::NFTA_PAYLOAD_BASE,
                        be32(nfnetlink::NFT_PAYLOAD_TRANSPORT_HEADER),
                    ),
                    (nfnetlink::NFTA_PAYLOAD_OFFSET, be32(d.offset)),
                    (nfnetlink::NFTA_PAYLOAD_LEN, be32(2)),
                ],
            ),
        ]
    }

    /// The count in the counter `d`'s map names for the packet's port.
    fn count(d: &Direction) -> Vec<Expression> {
        let objref = expression(
            "objref",
            vec![
                (3, be32(1)),
                (
                    nfnetlink::NFTA_OBJREF_SET_NAME,
                    format!("{}\0", d.map).into(),
                ),
            ],
        );
        [&port_key(d)[..], &[objref]].concat()
    }

    /// A netlink attribute: length, type, `payload` padded to 4 bytes.
    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let length = u16::try_from(4 + payload.len()).unwrap();
        let mut bytes = [length.to_ne_bytes(), kind.to_ne_bytes()].concat();
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    /// An `immediate` giving the verdict `code` (to `chain`, for a jump).
    fn verdict(code: i32, chain: Option<&str>) -> Expression {
        let mut verdict = attribute(1, &code.to_be_bytes());
        if let Some(chain) = chain {
            verdict.extend(attribute(2, format!("{chain}\0").as_bytes()));
        }
        expression(
            "immediate",
            vec![
                (nfnetlink::NFTA_IMMEDIATE_DREG, be32(0)),
                (nfnetlink::NFTA_IMMEDIATE_DATA, attribute(2, &verdict)),
            ],
        )
    }

    /// `d`'s rule of the host's packets as nfnetlink reads it back.
    fn rule_as_made(d: &Direction) -> Rule {
        Rule {
            chain: d.chain.into(),
            expressions: [
                &port_key(d)[..],
                &[lookup_in(d.map)],
                &fib_local(d),
                &count(d),
            ]
            .concat(),
        }
    }

    /// `d`'s rules where extra addresses are counted, as nfnetlink reads them back: the
    /// jump, the host's packets in the checked chain, then each family's.
    fn checked_rules_as_made(d: &Direction, families: &[usize]) -> Vec<Rule> {
        let jump = Rule {
            chain: d.chain.into(),
            expressions: [
                &port_key(d)[..],
                &[
                    lookup_in(d.map),
                    verdict(nfnetlink::NFT_JUMP, Some(d.checked)),
                ],
            ]
            .concat(),
        };
        let host = Rule {
            chain: d.checked.into(),
            expressions: [
                &fib_local(d)[..],
                &count(d),
                &[verdict(nfnetlink::NFT_RETURN, None)],
            ]
            .concat(),
        };
        let extra = families.iter().map(|&family| {
            let family = &FAMILIES[family];
            let checks = [
                expression(
                    "meta",
                    vec![
                        (nfnetlink::NFTA_META_KEY, be32(nfnetlink::NFT_META_NFPROTO)),
                        (1, be32(1)),
                    ],
                ),
                expression(
                    "cmp",
                    vec![
                        (nfnetlink::NFTA_CMP_SREG, be32(1)),
                        (nfnetlink::NFTA_CMP_OP, be32(nfnetlink::NFT_CMP_EQ)),
                        (nfnetlink::NFTA_CMP_DATA, cmp_data(&[family.nfproto])),
                    ],
                ),
                expression(
                    "payload",
                    vec![
                        (1, be32(1)),
                        (
                            nfnetlink::NFTA_PAYLOAD_BASE,
                            be32(nfnetlink::NFT_PAYLOAD_NETWORK_HEADER),
                        ),
                        (nfnetlink::NFTA_PAYLOAD_OFFSET, be32(family.offset(d))),
                        (nfnetlink::NFTA_PAYLOAD_LEN, be32(family.address_len)),
                    ],
                ),
                lookup_in(family.set),
            ];
            Rule {
                chain: d.checked.into(),
                expressions: [&checks[..], &count(d)].concat(),
            }
        });
        [jump, host].into_iter().chain(extra).collect()
    }

    /// [`as_made`] for a config with `extra_local_addresses`: the sets, the checked chains and
    /// their rules. nft's end at address 0 comes with each set.
    fn as_made_with_extra(plan: &[PlannedCounter], extra: &ExtraAddresses) -> TableContents {
        let mut contents = as_made(plan);
        contents.rules.clear();
        let families: Vec<usize> = extra.families().map(|(family, _)| family).collect();
        for d in &DIRECTIONS {
            contents.rules.extend(checked_rules_as_made(d, &families));
            contents.chains.push(Chain {
                name: d.checked.into(),
                hook: None,
                kind: None,
                policy: None,
            });
        }
        for (family, extra) in extra.families() {
            let family = &FAMILIES[family];
            let sentinel = (vec![0; family.address_len as usize], true);
            contents.sets.push(Set {
                name: family.set.into(),
                key_len: family.address_len,
                flags: nfnetlink::NFT_SET_INTERVAL,
                object_type: None,
                elements: std::iter::once(sentinel)
                    .chain(extra.elements.iter().cloned())
                    .rev()
                    .map(|(key, interval_end)| Element {
                        key,
                        object: None,
                        interval_end,
                    })
                    .collect(),
            });
        }
        contents.use_count = listed(&contents);
        contents
    }

    #[test]
    fn a_table_with_extra_addresses_as_made_is_adopted_and_changed_is_replaced() {
        let plan = web_plan();
        let rule = form("extra_local_addresses = [\"203.0.113.0/28\", \"2001:db8::5\"]\n");
        let RuleForm::HostsPackets { extra } = &rule else {
            panic!("by port alone")
        };
        let made = as_made_with_extra(&plan, extra);
        assert_eq!(judge(&plan, &rule, Some(&made)), Verdict::AsPlanned);
        let differs = |change: &dyn Fn(&mut TableContents)| {
            let mut table = made.clone();
            change(&mut table);
            table.use_count = listed(&table);
            match judge(&plan, &rule, Some(&table)) {
                Verdict::Differs(why) => why,
                other => panic!("{other:?}"),
            }
        };
        // An address's element gone from the set, or the set without its interval flag.
        let why = differs(&|t| drop(t.sets[2].elements.remove(0)));
        assert_eq!(
            why,
            "has the set extra_ipv4 with other addresses than the config's extra_local_addresses"
        );
        let why = differs(&|t| t.sets[3].flags = 0);
        assert!(why.contains("extra_ipv6"), "{why}");
        // Elements that time out (NFT_SET_TIMEOUT) leave without moving the generation.
        let why = differs(&|t| t.sets[3].flags |= 0x10);
        assert!(why.contains("extra_ipv6"), "{why}");
        let mut other_type = made.clone();
        other_type.sets[2].key_len = 16;
        assert_eq!(
            judge(&plan, &rule, Some(&other_type)),
            Verdict::NotOurs("holds the set or map extra_ipv4".into())
        );
        // The table of a build up to 9e21dbd for this config: by port alone, no sets.
        let mut earlier = as_made(&plan);
        for rule in &mut earlier.rules {
            rule.expressions.drain(..5).for_each(drop);
        }
        earlier.use_count = listed(&earlier);
        assert_eq!(
            judge(&plan, &rule, Some(&earlier)),
            Verdict::Differs(
                "counts by port alone in its chain count_in where the config wants the host's packets and its extra IPv4 and IPv6 addresses (made by an earlier build, or under another config)".into()
            )
        );
        // A config without extra addresses: the rules of the table with them, then its sets.
        let why = match judge(&plan, &hosts(), Some(&made)) {
            Verdict::Differs(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            why.starts_with("counts the host's packets and its extra"),
            "{why}"
        );
        let mut sets_left = as_made(&plan);
        sets_left.sets.extend(made.sets[2..].iter().cloned());
        sets_left.use_count = listed(&sets_left);
        assert_eq!(
            judge(&plan, &hosts(), Some(&sets_left)),
            Verdict::Differs("holds 4 sets and maps where the config wants 2".into())
        );
        // The checked chains gone with their rules: the jumps read as ours, and differ.
        let why = differs(&|t| {
            t.chains.truncate(2);
            t.rules.retain(|r| r.chain.starts_with("count_"));
        });
        assert!(
            why.starts_with("holds 1 rules in its chain count_in and checked_in"),
            "{why}"
        );
        // An extra rule twice, or the families' rules the other way round.
        let why = differs(&|t| t.rules.push(t.rules[2].clone()));
        assert!(
            why.starts_with("holds 5 rules in its chain count_in and checked_in"),
            "{why}"
        );
        let why = differs(&|t| t.rules.swap(2, 3));
        assert!(
            why.starts_with("holds 4 rules in its chain count_in and checked_in"),
            "{why}"
        );
        // The checked chain made a base chain.
        let why = differs(&|t| t.chains[2].hook = Some((NF_INET_PRE_ROUTING, 0)));
        assert!(why.contains("as a base chain"), "{why}");
        // A rule that checks another set, or another family's address at IPv4's offset, or
        // jumps elsewhere: not ours.
        let mut other_set = made.clone();
        other_set.rules[2].expressions[3] = lookup_in("blocklist");
        assert!(matches!(
            judge(&plan, &rule, Some(&other_set)),
            Verdict::NotOurs(why) if why.contains("a rule in checked_in")
        ));
        let mut other_jump = made.clone();
        other_jump.rules[0].expressions[3] = verdict(nfnetlink::NFT_JUMP, Some("checked_out"));
        assert!(matches!(
            judge(&plan, &rule, Some(&other_jump)),
            Verdict::NotOurs(why) if why.contains("a rule in count_in")
        ));
        let mut other_offset = made.clone();
        other_offset.rules[3].expressions[2].data[2].1 = be32(16);
        assert!(matches!(
            judge(&plan, &rule, Some(&other_offset)),
            Verdict::NotOurs(_)
        ));
    }

    /// The table as `ruleset` makes it for `plan`, as nfnetlink reads it back.
    fn as_made(plan: &[PlannedCounter]) -> TableContents {
        let mut contents = TableContents {
            handle: 3,
            ..TableContents::default()
        };
        for d in &DIRECTIONS {
            contents.chains.push(Chain {
                name: d.chain.into(),
                hook: Some((d.hook_number, d.priority)),
                kind: Some("filter".into()),
                policy: Some(NF_ACCEPT),
            });
            contents.rules.push(rule_as_made(d));
            contents.sets.push(Set {
                name: d.map.into(),
                key_len: 8,
                flags: 0x48, // a map of objects
                object_type: Some(nfnetlink::NFT_OBJECT_COUNTER),
                elements: plan
                    .iter()
                    .filter(|c| c.inbound == d.inbound)
                    .map(|c| Element {
                        key: element_key(c.protocol, c.port).to_vec(),
                        object: Some(c.name.clone()),
                        interval_end: false,
                    })
                    .collect(),
            });
        }
        contents.objects = plan
            .iter()
            .map(|c| Object {
                name: c.name.clone(),
                kind: nfnetlink::NFT_OBJECT_COUNTER,
                comment: Some(COMMENT.into()),
            })
            .collect();
        contents.use_count = listed(&contents);
        contents
    }

    /// The kernel's count of what `table` holds, no flowtable among it.
    fn listed(table: &TableContents) -> u32 {
        u32::try_from(table.chains.len() + table.sets.len() + table.objects.len()).unwrap()
    }

    fn web_plan() -> Vec<PlannedCounter> {
        let config = Config::from_toml(
            "t.toml",
            "[[routes]]\nname = \"web\"\nports = [80]\n\n[dns]\nports = [53]\n",
        )
        .unwrap();
        plan(&config)
    }

    #[test]
    fn a_table_as_made_is_adopted_and_one_of_ours_changed_is_replaced() {
        let plan = web_plan();
        let made = as_made(&plan);
        assert_eq!(judge(&plan, &hosts(), None), Verdict::Absent);
        assert_eq!(judge(&plan, &hosts(), Some(&made)), Verdict::AsPlanned);
        let differs = |change: &dyn Fn(&mut TableContents)| {
            let mut table = made.clone();
            change(&mut table);
            table.use_count = listed(&table);
            match judge(&plan, &hosts(), Some(&table)) {
                Verdict::Differs(why) => why,
                other => panic!("{other:?}"),
            }
        };
        // `nft flush table`: the chains stay, their rules go.
        let why = differs(&|t| t.rules.clear());
        assert!(why.contains("0 rules in its chain count_in"), "{why}");
        // The previous build's table: out before source NAT, counters without a comment.
        let why = differs(&|t| t.chains[1].hook = Some((NF_INET_POST_ROUTING, -300)));
        assert!(
            why.contains("count_out") && why.contains("priority 300"),
            "{why}"
        );
        let why = differs(&|t| {
            for object in &mut t.objects {
                object.comment = None;
            }
        });
        assert!(why.contains("earlier build"), "{why}");
        // A build's up to 2ca4b1a, whose rules counted by port alone; and the other
        // way round, for a config that wants the port alone.
        let port_alone = |t: &mut TableContents| {
            for rule in &mut t.rules {
                rule.expressions.drain(..5).for_each(drop);
            }
        };
        let why = differs(&port_alone);
        assert_eq!(
            why,
            "counts by port alone in its chain count_in where the config wants the host's packets alone (made by an earlier build, or under another config)"
        );
        let mut by_port = made.clone();
        port_alone(&mut by_port);
        assert_eq!(
            judge(&plan, &RuleForm::PortAlone, Some(&by_port)),
            Verdict::AsPlanned
        );
        assert!(matches!(
            judge(&plan, &RuleForm::PortAlone, Some(&made)),
            Verdict::Differs(why) if why.starts_with("counts the host's packets alone in its chain count_in")
        ));
        // Another config's, a port's element gone, made dormant.
        let why = differs(&|t| t.objects.truncate(2));
        assert!(why.contains("where the config wants"), "{why}");
        let why = differs(&|t| t.sets[0].elements.pop().map(drop).unwrap());
        assert!(why.contains("map ports_in"), "{why}");
        let why = differs(&|t| t.flags = 1);
        assert!(why.contains("dormant"), "{why}");
        // A rule of ours doubled.
        let why = differs(&|t| t.rules.push(t.rules[0].clone()));
        assert!(why.contains("2 rules"), "{why}");
    }

    #[test]
    fn a_table_that_is_not_recognisably_ours_is_never_ours() {
        let plan = web_plan();
        let made = as_made(&plan);
        let not_ours = |change: &dyn Fn(&mut TableContents)| {
            let mut table = made.clone();
            change(&mut table);
            table.use_count = listed(&table);
            match judge(&plan, &hosts(), Some(&table)) {
                Verdict::NotOurs(why) => why,
                other => panic!("{other:?}"),
            }
        };
        // Debian's /etc/nftables.conf: `table inet filter` with input, forward and output.
        let firewall = TableContents {
            handle: 1,
            use_count: 3,
            chains: ["input", "forward", "output"]
                .into_iter()
                .map(|name| Chain {
                    name: name.into(),
                    hook: Some((1, 0)),
                    kind: Some("filter".into()),
                    policy: Some(0),
                })
                .collect(),
            ..TableContents::default()
        };
        assert_eq!(
            judge(&plan, &hosts(), Some(&firewall)),
            Verdict::NotOurs("holds the chain input".into())
        );
        let why = not_ours(&|t| t.chains[0].name = "input".into());
        assert_eq!(why, "holds the chain input");
        let why = not_ours(&|t| t.rules[0].expressions.truncate(1));
        assert!(
            why.contains("a rule in count_in that is not the collector's"),
            "{why}"
        );
        // The address check looks at another address, or at none.
        let why = not_ours(&|t| t.rules[0].expressions[3].data[2].1 = vec![0, 0, 0, 1]);
        assert!(why.contains("lookup fib cmp meta payload objref"), "{why}");
        let why = not_ours(&|t| t.rules[1].expressions.drain(2..5).for_each(drop));
        assert!(why.contains("a rule in count_out"), "{why}");
        let why = not_ours(&|t| t.rules[0].expressions[4].data[2].1[4] = 1);
        assert!(why.contains("count_in"), "{why}");
        let why = not_ours(&|t| t.sets[1].name = "blocklist".into());
        assert_eq!(why, "holds the set or map blocklist");
        let why = not_ours(&|t| t.objects[0].name = "tcp_080_in".into());
        assert_eq!(why, "holds the object tcp_080_in");
        let why = not_ours(&|t| t.objects[0].kind = 2);
        assert!(why.starts_with("holds the object"), "{why}");
        let why = not_ours(&|t| t.objects[0].comment = Some("mine".into()));
        assert!(why.contains("\"mine\""), "{why}");
        // The kernel counts a flowtable, which no dump here lists.
        let mut flowtable = made.clone();
        flowtable.use_count += 1;
        assert!(matches!(
            judge(&plan, &hosts(), Some(&flowtable)),
            Verdict::NotOurs(why) if why.contains("flowtable")
        ));
        let why = not_ours(&|t| t.userdata = Some(vec![0, 3, b'f', b'w', 0]));
        assert!(why.contains("\"fw\""), "{why}");
        // What nft 1.1.6 and later write into each table they make: its version (12 bytes)
        // and build time (8 bytes). Still ours.
        let mut stamped = made.clone();
        let mut stamp = vec![1, 12];
        stamp.extend([1, 1, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        stamp.extend([2, 8, 0x68, 0x9a, 0, 0, 0, 0, 0, 0]);
        stamped.userdata = Some(stamp.clone());
        assert!(matches!(
            judge(&plan, &hosts(), Some(&stamped)),
            Verdict::AsPlanned
        ));
        stamp.push(5);
        let why = not_ours(&|t| t.userdata = Some(stamp.clone()));
        assert!(why.contains("never writes"), "{why}");
        assert!(not_ours(&|t| *t = TableContents::default()).contains("empty"));
        // An earlier build's table (no comments), its rules flushed: still ours, replaced.
        let mut earlier = made.clone();
        earlier.rules.clear();
        for object in &mut earlier.objects {
            object.comment = None;
        }
        assert!(matches!(
            judge(&plan, &hosts(), Some(&earlier)),
            Verdict::Differs(_)
        ));
    }

    #[test]
    fn element_keys_are_protocol_and_port_in_registers_of_their_own() {
        // As `nft --debug=netlink` prints `tcp . 80`: 00000006 00005000.
        assert_eq!(element_key(Protocol::Tcp, 80), [6, 0, 0, 0, 0, 0x50, 0, 0]);
        assert_eq!(
            element_key(Protocol::Udp, 0x1234),
            [17, 0, 0, 0, 0x12, 0x34, 0, 0]
        );
        assert!(is_our_counter_name("udp_53_out") && is_our_counter_name("tcp_0_in"));
        for name in [
            "tcp_53",
            "sctp_53_in",
            "tcp_+53_in",
            "tcp_65536_in",
            "tcp__in",
        ] {
            assert!(!is_our_counter_name(name), "{name}");
        }
    }
}
